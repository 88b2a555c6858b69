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

from tunelab.models.methods import Method
from tunelab.models.nll import HEAD_CHUNK
from tunelab.models.shape import ModelShape

GIB = 2**30
#: bytes of a weight by how it is held
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: the runtime beside the tensors: CUDA context, cuBLAS workspace and allocator slack on a
#: GPU; the interpreter, torch, transformers, tokenizer and data in a CPU process
OVERHEAD = {"cuda": 1.0 * GIB, "cpu": 0.75 * GIB}
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

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Memory:
    """Bytes by component; ``peak`` is what the step needs at its worst moment."""

    weights: int
    reference: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int  # the LM head's chunk of fp32 logits, its softmax and gradient
    overhead: int
    trainable: int  # trainable parameters (count)
    activations_end: int  # activations still alive when every gradient is
    early_gradients: int = 0  # gradients alive from the backward's start (a tied embedding's)

    @property
    def static(self) -> int:
        return self.weights + self.reference + self.adapter + self.optimizer

    @property
    def tensors(self) -> int:
        """Peak of the tensors alone (what torch's memory tracker measures)."""
        start = self.activations + self.logits + self.early_gradients
        end = self.gradients + self.activations_end
        return self.static + max(start, end)

    @property
    def peak(self) -> int:
        return self.tensors + self.overhead

    def as_dict(self) -> dict:
        keys = ("weights", "reference", "adapter", "gradients", "optimizer", "activations",
                "logits", "overhead")  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        out.update(tensors=self.tensors, peak=self.peak, trainable=self.trainable)
        return out


def layer_activation_elements(shape: ModelShape) -> int:
    """Elements one decoder layer keeps per token for the backward pass (eager, SDPA):
    two norms' inputs and outputs, q/k/v after RoPE, the attention output and o_proj's input,
    the MLP's gate, activation, up and product."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = q + 2 * kv + 2 * q
    mlp = 4 * shape.intermediate if shape.family != "phi" else 2 * shape.intermediate
    return 2 * NORM_SAVED * shape.hidden + attention + mlp


def estimate_memory(shape: ModelShape, method: Method, act: Activity) -> Memory:
    """The breakdown of one training step's memory (see the module docstring); ``method``
    sizes what it trains and holds (models/methods)."""
    trainable = method.trainable_params(shape)
    adapter = 0 if method.trains_base else 4 * trainable  # adapters are fp32 (PEFT's default)
    weights = method.weight_bytes(shape, act.precision)
    act_bytes = 4 if act.precision == "fp32" else 2
    trained_layers = method.trained_layers(shape)
    per_layer = layer_activation_elements(shape) * act.tokens * act_bytes
    residual = shape.hidden * act.tokens * act_bytes  # a layer's input, kept by checkpointing
    if act.gradient_checkpointing:
        activations = trained_layers * residual + per_layer
    else:
        activations = trained_layers * per_layer
    rows = min(HEAD_CHUNK, max(act.weighted_tokens, 1))
    hidden_rows = act.weighted_tokens * shape.hidden * act_bytes  # the head's gathered input
    logits = 3 * rows * shape.vocab * 4 + hidden_rows
    embed_grad = (
        4 * shape.embedding if method.trains_embedding(shape) else 0
    )  # first out of the head
    return Memory(
        weights=weights, reference=weights if act.reference_copy else 0, adapter=adapter,
        gradients=4 * trainable, optimizer=8 * trainable, activations=activations + residual,
        logits=logits, overhead=int(OVERHEAD[act.device]), trainable=trainable,
        activations_end=per_layer if not act.gradient_checkpointing else residual,
        early_gradients=embed_grad,
    )  # fmt: skip


def rule_of_thumb(shape: ModelShape, precision: str) -> int:
    """The common sanity line: training needs about 2.5 x the model's weights."""
    return int(2.5 * shape.params * BYTES[precision])
