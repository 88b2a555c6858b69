"""The written-out RMSNorm (models/norms.py): transformers' Llama-family norm's numbers, and
only on modules that run exactly that norm."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.models.norms import fuse_rms_norms
from tunelab.testing import tiny_model, tiny_tokenizer


def _norm(dtype, trainable):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(trainable)
    return norm.to(dtype)


def _run(norm, x, grad):
    x = x.detach().requires_grad_(True)
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_written_out_norm_gives_transformers_numbers(dtype, trainable):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 7, 96, generator=g) * 3).to(dtype)
    grad = torch.randn(4, 7, 96, generator=g).to(dtype)
    want = _run(_norm(dtype, trainable), x, grad)
    fused = _norm(dtype, trainable)
    assert fuse_rms_norms(fused) == 1
    got = _run(fused, x, grad)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    if dtype == torch.float32:
        for a, b in zip(got, want, strict=True):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # one rounding each way: equal to the bit nearly everywhere, 1 ulp elsewhere
        assert (got[0] != want[0]).float().mean() < 0.01
        torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
        assert ((got[1].float() - want[1].float()).norm() / want[1].float().norm()) < 5e-3
    assert (got[2] is None) is (not trainable)
    if trainable:
        torch.testing.assert_close(got[2].float(), want[2].float(), rtol=2e-2, atol=1e-3)


def test_only_llama_family_norms_are_written_out_and_the_model_trains_the_same():
    tok = tiny_tokenizer()
    assert fuse_rms_norms(tiny_model(tok, arch="gemma")) == 0  # (1 + weight): its own norm

    class Rewritten(LlamaRMSNorm):  # the same fields, another forward
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    assert fuse_rms_norms(Rewritten(8)) == 0
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        model = tiny_model(tok, arch="qwen2")
        if fused:
            assert fuse_rms_norms(model) == 2 * 2 + 1  # two per layer, and the final one
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
