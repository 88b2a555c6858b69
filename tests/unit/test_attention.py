"""Attention as grouped matmuls (models/attention.py): transformers' eager attention's numbers,
fewer copies, and only the probabilities kept — in the compute dtype."""

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from tunelab.models import attention
from tunelab.testing import tiny_model, tiny_tokenizer


class _Layer(torch.nn.Module):
    num_key_value_groups = 3


def _inputs(dtype, b=3, heads=6, kv=2, tq=20, tk=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, tq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, kv, tk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, kv, tk, d, generator=g).to(dtype).requires_grad_()
    lengths = [tk, tk - 7, tk - 12][:b]  # right padding, as collate makes it
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None, None].repeat(b, 1, 1, 1)
    for i, n in enumerate(lengths):
        allowed[i, :, :, n:] = False
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return q, k, v, mask


def _run(fn, q, k, v, mask, seed=1, scaling=0.2):  # not 1/sqrt(d): the one passed is used
    layer = _Layer().train()
    layer.num_key_value_groups = q.shape[1] // k.shape[1]
    out, _ = fn(layer, q, k, v, mask, scaling=scaling, dropout=0.0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


@pytest.mark.parametrize("tq", [20, 1])  # a whole batch; one new token against a cache of 20
def test_matmul_attention_equals_eager_in_fp32(tq):
    q, k, v, mask = _inputs(torch.float32, tq=tq)
    ref, ref_grads = _run(eager_attention_forward, q, k, v, mask)
    out, grads = _run(attention.matmul_attention, q, k, v, mask)
    assert out.shape == ref.shape == (3, tq, 6, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_matmul_attention_without_a_mask_attends_to_every_key():
    q, k, v, _ = _inputs(torch.float32)
    ref, _ = _run(eager_attention_forward, q, k, v, None)
    out, _ = _run(attention.matmul_attention, q, k, v, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_matmul_attention_in_bf16_gives_eagers_probabilities():
    """The bf16 softmax accumulates in fp32 and rounds once: with a scale that is a power of two
    (1/8 for 64-wide heads, so scaling q first rounds nothing) the output is eager's (which
    takes the softmax in fp32 and casts) to the rounding of a bf16 product; the gradients
    agree to bf16's precision."""
    q, k, v, mask = _inputs(torch.bfloat16)
    ref, ref_grads = _run(eager_attention_forward, q, k, v, mask, scaling=0.125)
    out, grads = _run(attention.matmul_attention, q, k, v, mask, scaling=0.125)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2**-7)
    for g, r in zip(grads, ref_grads, strict=True):
        assert ((g.float() - r.float()).norm() / r.float().norm()).item() < 1e-2


def _saved_bytes(fn, q, k, v, mask) -> dict:
    """Bytes autograd keeps for the backward pass, by dtype, of tensors the size of the scores
    (a tensor two functions keep counted once)."""
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    kept: dict = {}
    seen = set()

    def pack(t):
        if t.numel() >= scores and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            kept[t.dtype] = kept.get(t.dtype, 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(_Layer(), q, k, v, mask, scaling=0.25, dropout=0.0)
    return kept


def test_matmul_attention_keeps_only_the_probabilities_in_the_compute_dtype():
    """What the memory estimate counts (models/memory.py): [B, H, T, T] in bf16 once — eager
    keeps an fp32 copy besides (6 bytes an entry)."""
    q, k, v, mask = _inputs(torch.bfloat16, b=2, heads=6, kv=2, tq=64, tk=64)
    entries = 2 * 6 * 64 * 64
    assert _saved_bytes(attention.matmul_attention, q, k, v, mask) == {torch.bfloat16: 2 * entries}
    eager = _saved_bytes(eager_attention_forward, q, k, v, mask)
    assert eager[torch.float32] == 4 * entries


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_a_model_with_matmul_attention_gives_eagers_loss_and_gradients(arch):
    """Registered with transformers (the eager mask with it): a padded batch's loss and
    gradients equal eager attention's."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, arch=arch)
    ids = torch.randint(5, len(tok), (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 4:] = 0, 0

    def loss_and_grads(impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(
            input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        ).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    attention.register()
    ref_loss, ref_grads = loss_and_grads("eager")
    loss, grads = loss_and_grads(attention.NAME)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_model_with_soft_capped_attention_gets_its_own_eager():
    """Gemma 2 caps its attention logits (``softcap``): the matmul attention hands the call to
    the model's own eager attention, so the loss is eager's exactly."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = tiny_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, attn_logit_softcapping=0.01, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    attention.register()
    with torch.no_grad():
        eager = model(input_ids=ids, labels=ids).loss
        model.set_attn_implementation(attention.NAME)
        matmul = model(input_ids=ids, labels=ids).loss
    assert matmul.item() == eager.item()
