"""The memory estimate: golden totals for the default model's shape (checked against torch's
memory tracker in bench/plan_memory.py; docs/plan.md has the table) and each component's
behaviour — what checkpointing, QLoRA, a reference copy, freeze and precision change."""

import pytest

from tunelab.config.schema import MethodConfig
from tunelab.models.memory import Activity, estimate_memory, rule_of_thumb
from tunelab.models.methods import get_method
from tunelab.models.shape import model_shape

SMOLLM2 = model_shape(dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                           tie_word_embeddings=True, head_dim=64))  # fmt: skip
LLAMA_8B = model_shape(dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=False, head_dim=128))  # fmt: skip
MIB = 2**20


def M(**kw):
    return get_method(MethodConfig(**kw))


def _act(**kw):
    base = dict(micro_batch=4, seq_len=128, weighted_tokens=508, precision="fp32", device="cpu")
    return Activity(**(base | kw))


def test_golden_totals_of_the_default_model():
    """MemTracker on fake tensors measured 2,534 MiB (full) and 1,501 MiB (LoRA) for these."""
    full = estimate_memory(SMOLLM2, M(name="full"), _act())
    lora = estimate_memory(SMOLLM2, M(name="lora"), _act())
    assert round(full.tensors / MIB) == 2599
    assert round(lora.tensors / MIB) == 1521
    assert full.trainable == 134_515_008 and lora.trainable == 4_884_480
    assert full.optimizer == 8 * full.trainable and full.gradients == 4 * full.trainable
    assert lora.overhead == 768 * MIB  # the CPU runtime
    assert lora.allocator == (lora.activations + lora.logits) // 2  # freed blocks glibc keeps
    assert round(lora.peak / MIB) == 2765  # a real run of this shape peaked at 2.57-3.01 GiB


def test_gradient_checkpointing_keeps_only_layer_inputs():
    plain = estimate_memory(
        SMOLLM2, M(name="lora"), _act(seq_len=512, micro_batch=8, weighted_tokens=8 * 511)
    )
    ckpt = estimate_memory(SMOLLM2, M(name="lora"), _act(seq_len=512, micro_batch=8, weighted_tokens=8 * 511,
                                                                    gradient_checkpointing=True))  # fmt: skip
    assert ckpt.activations < plain.activations / 5
    assert round(ckpt.tensors / MIB) == 1145  # MemTracker: 1,176 (the head's chunk, then one layer)
    assert ckpt.weights == plain.weights and ckpt.logits == plain.logits


def test_qlora_holds_decoder_linears_in_about_4_bits():
    lora = estimate_memory(LLAMA_8B, M(name="lora"), _act(precision="bf16", device="cuda"))
    q4 = estimate_memory(LLAMA_8B, M(name="qlora", bits=4), _act(precision="bf16", device="cuda"))
    q8 = estimate_memory(LLAMA_8B, M(name="qlora", bits=8), _act(precision="bf16", device="cuda"))
    assert lora.weights == 2 * LLAMA_8B.params
    rest = 2 * (LLAMA_8B.params - LLAMA_8B.linear_params)  # embeddings, head, norms in 16 bits
    assert q4.weights == int(LLAMA_8B.linear_params * 4.127 / 8) + rest
    assert q8.weights == LLAMA_8B.linear_params + rest
    assert 5.0 < q4.weights / 2**30 < 5.5 and q4.adapter == lora.adapter


def test_a_frozen_reference_copy_doubles_the_weights():
    alone = estimate_memory(SMOLLM2, M(name="full"), _act())
    with_copy = estimate_memory(SMOLLM2, M(name="full"), _act(reference_copy=True))
    assert with_copy.reference == alone.weights
    assert with_copy.tensors - alone.tensors == alone.weights


def test_freeze_saves_activations_only_of_the_trained_layers():
    two = estimate_memory(SMOLLM2, M(name="freeze", trainable_layers=2), _act())
    full = estimate_memory(SMOLLM2, M(name="full"), _act())
    assert two.trainable == 2 * SMOLLM2.layer_params
    assert two.activations < full.activations / 10


def test_half_precision_halves_the_frozen_base_and_the_activations():
    fp32 = estimate_memory(SMOLLM2, M(name="lora"), _act())
    bf16 = estimate_memory(SMOLLM2, M(name="lora"), _act(precision="bf16", device="cuda"))
    assert bf16.weights * 2 == fp32.weights
    assert bf16.activations * 2 == fp32.activations
    assert bf16.adapter == fp32.adapter  # adapters stay fp32 (PEFT's default)
    full = estimate_memory(SMOLLM2, M(name="full"), _act(precision="bf16", device="cuda"))
    assert full.weights == 4 * SMOLLM2.params  # trained weights are fp32 master weights


def test_the_head_computes_only_weighted_targets_a_chunk_at_a_time():
    few = estimate_memory(SMOLLM2, M(name="lora"), _act(weighted_tokens=100))
    many = estimate_memory(SMOLLM2, M(name="lora"), _act(micro_batch=64, weighted_tokens=8000))
    assert few.logits < many.logits
    chunk = 3 * 512 * SMOLLM2.vocab * 4
    assert many.logits - chunk == 8000 * SMOLLM2.hidden * 4  # the chunk is capped; the rows are not


@pytest.mark.parametrize("shape", [SMOLLM2, LLAMA_8B])
def test_rule_of_thumb_is_two_and_a_half_weights(shape):
    assert rule_of_thumb(shape, "bf16") == int(2.5 * 2 * shape.params)


def test_the_cpu_optimizer_step_holds_temporaries_of_the_largest_trained_tensor():
    """Single-tensor AdamW (the CPU's) makes ~3 temporaries of each parameter in turn: for a
    1B full fine-tune the embedding's 3 GiB decide the peak (MemTracker: TEMP 3,006 MiB)."""
    llama_1b = model_shape(dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=True, head_dim=64))  # fmt: skip
    cpu = estimate_memory(
        llama_1b, M(name="full"), _act(micro_batch=2, seq_len=512, weighted_tokens=1022)
    )
    cuda = estimate_memory(llama_1b, M(name="full"), _act(micro_batch=2, seq_len=512, weighted_tokens=1022,
                                                         device="cuda"))  # fmt: skip
    assert round(cpu.update / MIB) == 3006 and cuda.update == 0  # fused AdamW on CUDA
    assert round(cpu.tensors / MIB) == 21863  # MemTracker: 20,861
    lora = estimate_memory(llama_1b, M(name="lora"), _act())
    assert lora.update == 3 * 4 * 16 * 8192


def test_matmul_attention_keeps_its_probabilities():
    """Matmul attention (short sequences on a CPU) keeps each layer's probabilities in the
    compute dtype: batch x heads x length² x 2 bytes in bf16, 4 in fp32, every trained layer."""
    for precision, size in (("bf16", 2), ("fp32", 4)):
        sdpa = estimate_memory(SMOLLM2, M(name="lora"), _act(precision=precision))
        matmul = estimate_memory(SMOLLM2, M(name="lora"),
                                 _act(precision=precision, matmul_attention=True))  # fmt: skip
        assert matmul.activations - sdpa.activations == 30 * 4 * 9 * 128**2 * size


def test_matmul_attention_is_counted_only_up_to_the_width_that_runs_it():
    """With rows past MATMUL_MAX_LEN (<matmul>+sdpa on a CPU) the widest matmul micro-batch is
    MATMUL_MAX_LEN wide: its probabilities are counted at that width, not the longest row's."""
    from tunelab.models.device import MATMUL_MAX_LEN

    long = dict(precision="bf16", seq_len=800)
    sdpa = estimate_memory(SMOLLM2, M(name="lora"), _act(**long))
    mixed = estimate_memory(SMOLLM2, M(name="lora"), _act(**long, matmul_attention=True))
    assert mixed.activations - sdpa.activations == 30 * 4 * 9 * MATMUL_MAX_LEN**2 * 2
