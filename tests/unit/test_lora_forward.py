"""LoRA's scale-and-add as one addmm (models/methods/lora.py::fuse_scale_and_add): PEFT's
numbers, and PEFT's own forward wherever the layer is not plain LoRA."""

import pytest
import torch

from tunelab.config.schema import MethodConfig
from tunelab.models.methods import get_method
from tunelab.testing import tiny_model, tiny_tokenizer


def _lora(dtype=torch.float32, **kw):
    tok = tiny_tokenizer()
    model = get_method(MethodConfig(name="lora", **kw)).apply(tiny_model(tok).to(dtype))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give the adapters something to add
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(5, len(tok), (2, 10), generator=g)
    return model, ids


def _peft_forward(model):
    """The same model with PEFT's own forward on every LoRA layer."""
    for module in model.modules():
        module.__dict__.pop("forward", None)


def _loss_and_grads(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_every_lora_layer_gets_the_fused_forward():
    model, _ = _lora()
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all("forward" in m.__dict__ for m in layers)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_gives_pefts_loss_and_gradients(autocast):
    model, ids = _lora()
    loss, grads = _loss_and_grads(model, ids, autocast)
    _peft_forward(model)
    ref_loss, ref_grads = _loss_and_grads(model, ids, autocast)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    if not autocast:  # fp32: the same sums in another order
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    else:  # bf16: one rounding where PEFT rounds the product, the scaling and the sum
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        for name, g in ref_grads.items():
            assert ((grads[name] - g).norm() / g.norm()).item() < 0.05, name


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_disabled_or_merged_adapter_takes_pefts_path():
    model, ids = _lora()
    plain = _logits(tiny_model(tiny_tokenizer()), ids)  # the same base weights, no adapters
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), plain)
    model.merge_adapter()  # the base weights now hold the adapter: nothing more to add
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [{"dora": True}, {"dropout": 0.3}])
def test_dora_and_dropout_run_pefts_forward(kw):
    """Layers the addmm does not cover give exactly PEFT's output (same seed for dropout)."""
    model, ids = _lora(**kw)
    model.train()
    torch.manual_seed(0)
    fused = model(input_ids=ids).logits.detach()
    _peft_forward(model)
    torch.manual_seed(0)
    torch.testing.assert_close(fused, model(input_ids=ids).logits.detach(), rtol=0, atol=0)
