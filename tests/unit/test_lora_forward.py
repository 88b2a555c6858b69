"""A plain LoRA layer's forward (models/methods/lora_forward.py): the scale-and-add as one addmm,
siblings' A products as one — PEFT's numbers, and PEFT's own forward wherever the layer is not
plain LoRA."""

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


def _layers(model):
    from peft.tuners.lora.layer import Linear

    return {n.rsplit(".", 1)[-1] + n.split("layers.")[1].split(".")[0]: m
            for n, m in model.named_modules() if type(m) is Linear}  # fmt: skip


def test_siblings_make_their_a_products_in_one():
    """q, k, v (and gate, up) of a layer share one A product: their lora_A modules are never
    called in a training forward, o_proj's and down_proj's are, and the loss and gradients are
    PEFT's (the test above); the grouping is per parent module."""
    model, ids = _lora()
    layers = _layers(model)
    groups = {k: m.__dict__.get("tunelab_siblings") for k, m in layers.items()}
    assert groups["q_proj0"] is groups["k_proj0"] is groups["v_proj0"] is not None
    assert groups["gate_proj0"] is groups["up_proj0"] is not None
    assert groups["q_proj0"] is not groups["q_proj1"] and groups["o_proj0"] is None
    called = []
    for key, layer in layers.items():
        layer.lora_A["default"].register_forward_hook(lambda *_, key=key: called.append(key))
    _loss_and_grads(model, ids, autocast=True)
    assert sorted({k[:-1] for k in called}) == ["down_proj", "o_proj"]
    assert all(g is None or g._input is None for g in groups.values())  # nothing held after


def test_a_sibling_that_is_not_plain_lora_leaves_the_others_their_own_products():
    """v_proj with dropout runs PEFT's forward: q and k do not stack its A weights in with
    theirs, nothing is left held, and the output is PEFT's."""
    from torch import nn

    model, ids = _lora()
    layers = _layers(model)
    for i in (0, 1):
        layers[f"v_proj{i}"].lora_dropout["default"] = nn.Dropout(0.3)
    model.train()
    torch.manual_seed(0)
    fused = model(input_ids=ids).logits.detach()
    groups = {id(g): g for m in layers.values() if (g := m.__dict__.get("tunelab_siblings"))}
    assert all(g._input is None for g in groups.values())
    _peft_forward(model)
    torch.manual_seed(0)
    torch.testing.assert_close(fused, model(input_ids=ids).logits.detach(), rtol=1e-6, atol=1e-6)


def test_siblings_called_out_of_turn_get_their_own_product():
    """A member called on another input, twice on one input, or after an optimizer step changed
    the A weights (in place) gets exactly the product PEFT's forward gives it then."""
    model, _ = _lora()
    layers = _layers(model)
    q, k, v = (layers[f"{n}_proj0"] for n in "qkv")
    g = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(2, 7, q.in_features, generator=g) for _ in range(2))

    def peft(layer, x):
        return type(layer).forward(layer, x)

    with torch.no_grad():
        for layer, x in ((q, x1), (k, x2), (v, x1), (q, x1), (q, x1), (k, x1)):
            torch.testing.assert_close(layer(x), peft(layer, x), rtol=1e-6, atol=1e-6)
        q(x2)  # the group now holds k's and v's parts of x2
        v.lora_A["default"].weight.add_(0.5)  # an optimizer step between the calls
        torch.testing.assert_close(v(x2), peft(v, x2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k(x2), peft(k, x2), rtol=1e-6, atol=1e-6)
