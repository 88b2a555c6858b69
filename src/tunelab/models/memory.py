"""Training memory from a model's shape, broken down by what holds it — the estimate
``tunelab plan`` prints and fits against devices, without reading weights.

The peak of a training step is the static part (weights, adapter, optimizer states, a frozen
reference copy) plus the larger of two moments of the backward pass: its start (every saved
activation alive, the LM head's logits chunk and the first gradients) and its end (every
gradient alive, one layer's activations). The coefficients are per-token tensor counts of the
modules transformers runs (decoder layers in eager mode with SDPA, tunelab's chunked LM head);
``bench/plan_memory.py`` checks the total against torch's own memory tracker on fake tensors
and ``docs/plan.md`` keeps the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.models.device import HEAD_CHUNK, MATMUL_MAX_LEN
from tunelab.models.methods import Method
from tunelab.models.shape import ModelShape

GIB = 2**30
#: bytes of a weight by how it is held
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: the runtime beside the tensors: CUDA context, cuBLAS workspace and allocator slack on a
#: GPU; the interpreter, torch, transformers, tokenizer and data in a CPU process
OVERHEAD = {"cuda": 1.0 * GIB, "cpu": 0.75 * GIB}
#: A CPU process keeps freed blocks of the step's activations and temporaries (glibc's heap):
#: its peak resident memory exceeds the live tensors' by about half the activations (measured
#: at micro-batch 4 and 16 on the default model, docs/plan.md). CUDA's caching allocator is
#: not counted here (max_memory_allocated does not see it either).
ALLOCATOR_SHARE = {"cuda": 0.0, "cpu": 0.5}
#: one RMSNorm keeps its fp32 input and normalised output
NORM_SAVED = 2


@dataclass(frozen=True)
class Activity:
    """What the step does: the largest micro-batch (padded sequences x length), how many of its
    targets carry loss weight, precision, device, gradient checkpointing, a reference copy."""

    micro_batch: int  # sequences in a forward pass (a preference pair counts two)
    seq_len: int  # padded length of that micro-batch
    weighted_tokens: int  # its targets with loss weight > 0 (the only ones the head computes)
    precision: str  # fp32 | bf16 | fp16
    device: str  # cpu | cuda
    gradient_checkpointing: bool = False
    reference_copy: bool = False  # a frozen second copy of the model (DPO/KTO without precompute)
    matmul_attention: bool = False  # attention as matmuls (rows up to MATMUL_MAX_LEN on a CPU)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Memory:
    """Bytes by component; ``peak`` is what the step needs at its worst moment."""

    weights: int
    reference: int  # a frozen copy of the model (DPO/KTO without precomputed log-probs)
    adapter: int
    gradients: int
    optimizer: int  # AdamW's two fp32 states per trained parameter
    activations: int  # kept for the backward pass (with checkpointing: layer inputs + one layer)
    logits: int  # the LM head's chunk of fp32 logits, its softmax and gradient; its input rows
    update: int  # temporaries of the optimizer step (CPU AdamW, one parameter at a time)
    allocator: int  # freed blocks the allocator keeps (CPU)
    overhead: int
    trainable: int  # trainable parameters (count)
    recompute: int = 0  # the one layer checkpointing recomputes (part of activations)
    last_layer: int = 0  # activations still alive when every gradient is
    early_gradients: int = 0  # gradients alive from the backward's start (a tied embedding's)

    @property
    def static(self) -> int:
        return self.weights + self.reference + self.adapter + self.optimizer

    @property
    def tensors(self) -> int:
        """Peak of the tensors alone (what torch's memory tracker measures): the static part
        plus the worst of the backward's start (every activation, the head's chunk — which a
        checkpointed layer's recomputation follows rather than joins), its end (every gradient)
        and the optimizer step (every gradient and the update's temporaries)."""
        if self.recompute:  # the head's chunk is freed before the first layer is recomputed
            start = self.activations - self.recompute + max(self.logits, self.recompute)
        else:
            start = self.activations + self.logits
        start += self.early_gradients
        end = self.gradients + self.last_layer
        step = self.gradients + self.update
        return self.static + max(start, end, step)

    @property
    def peak(self) -> int:
        return self.tensors + self.allocator + self.overhead

    def as_dict(self) -> dict:
        keys = ("weights", "reference", "adapter", "gradients", "optimizer", "update",
                "activations", "logits", "allocator", "overhead")  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        out.update(tensors=self.tensors, peak=self.peak, trainable=self.trainable)
        return out


def layer_activation_elements(shape: ModelShape) -> int:
    """Elements one decoder layer keeps per token for the backward pass (eager, SDPA): two
    norms' fp32 inputs and outputs; q after RoPE, k and v repeated to the query heads (SDPA is
    called with an attention mask, so transformers expands grouped k/v), the attention output
    and o_proj's input; the MLP's gate, activation, up and product."""
    q = shape.heads * shape.head_dim
    attention = 5 * q
    mlp = 4 * shape.intermediate if shape.family != "phi" else 2 * shape.intermediate
    return 2 * NORM_SAVED * shape.hidden + attention + mlp


def estimate_memory(shape: ModelShape, method: Method, act: Activity) -> Memory:
    """The breakdown of one training step's memory (see the module docstring); ``method``
    sizes what it trains and holds (models/methods)."""
    trainable = method.trainable_params(shape)
    weights = method.weight_bytes(shape, act.precision)
    act_bytes = 4 if act.precision == "fp32" else 2
    per_layer = layer_activation_elements(shape) * act.tokens * act_bytes
    if act.matmul_attention:  # the probabilities, [batch, heads, length, length], of the
        width = min(act.seq_len, MATMUL_MAX_LEN)  # widest micro-batch that runs matmuls
        per_layer += act.micro_batch * shape.heads * width**2 * act_bytes
    residual = shape.hidden * act.tokens * act_bytes  # a layer's input; the final norm's
    kept = method.trained_layers(shape) * (residual if act.gradient_checkpointing else per_layer)
    recompute = per_layer if act.gradient_checkpointing else 0
    rows = min(HEAD_CHUNK, max(act.weighted_tokens, 1))
    logits = 3 * rows * shape.vocab * 4 + act.weighted_tokens * shape.hidden * act_bytes
    activations = kept + residual + recompute
    return Memory(
        weights=weights, reference=weights if act.reference_copy else 0,
        adapter=0 if method.trains_base else 4 * trainable,  # fp32 adapters (PEFT's default)
        gradients=4 * trainable, optimizer=8 * trainable, activations=activations, logits=logits,
        update=3 * 4 * method.largest_trained(shape) if act.device == "cpu" else 0,  # CUDA: fused
        allocator=int(ALLOCATOR_SHARE[act.device] * (activations + logits)),
        overhead=int(OVERHEAD[act.device]), trainable=trainable, recompute=recompute,
        last_layer=residual if act.gradient_checkpointing else per_layer,
        early_gradients=4 * shape.embedding if method.trains_embedding(shape) else 0,
    )  # fmt: skip


def rule_of_thumb(shape: ModelShape, precision: str) -> int:
    """The common sanity line: training needs about 2.5 x the model's weights."""
    return int(2.5 * shape.params * BYTES[precision])
