"""One contract, every method x objective: what the recipe relies on, checked on a tiny model."""

import itertools

import pytest
import torch

from tests.helpers import chat
from tunelab.config.schema import Config, MethodConfig
from tunelab.data.tokenize import EncodeOptions, encode
from tunelab.models.methods import get_method
from tunelab.models.tokenizer import pad_id
from tunelab.testing import tiny_model, tiny_tokenizer
from tunelab.train.loop import accumulate
from tunelab.train.objectives import get_objective

METHODS = {  # every method that runs on this machine (qlora needs CUDA: tests/gpu)
    "full": {},
    "freeze": {"trainable_layers": 1},
    "lora": {"r": 4},
}
OBJECTIVES = ["sft"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("chatml")


def _examples(tok):
    ex = [chat(f"question {i} about boxes", f"answer {i} " * (1 + i % 3)) for i in range(4)]
    return ex, encode(ex, tok, EncodeOptions()).examples


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method, objective", itertools.product(METHODS, OBJECTIVES))
def test_method_and_objective_contract(tok, tmp_path, method, objective):
    cfg = MethodConfig(name=method, **METHODS[method])
    m = get_method(cfg)
    obj = get_objective(Config.model_validate({"train": {"objective": objective}}))
    examples, tokenized = _examples(tok)
    obj.check_data(examples)  # conversations are what every objective accepts today

    torch.manual_seed(0)
    model = m.apply(tiny_model(tok))
    params = m.optimizer_parameters(model)
    assert params and all(p.requires_grad for _, p in params)
    before = _snapshot(model)

    batch = obj.collate(tokenized, pad_id(tok))
    assert obj.weight(batch) > 0
    loss = accumulate(model, obj, [batch])
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    torch.optim.AdamW([p for _, p in params], lr=1e-2).step()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trained  # only what the method trains has moved

    m.save(model, tmp_path / "w")
    torch.manual_seed(0)
    fresh = m.apply(tiny_model(tok, seed=1))
    m.load(fresh, tmp_path / "w")
    frozen_differs = any(
        not torch.equal(p, before[n]) for n, p in fresh.named_parameters() if n not in trained
    )
    if m.trains_base:  # full/freeze save the whole model: everything comes back
        after = dict(fresh.named_parameters())
        assert all(torch.equal(after[n], p) for n, p in model.named_parameters())
    else:  # an adapter is saved alone: the trained part comes back, the base is the caller's
        after = dict(fresh.named_parameters())
        assert all(torch.equal(after[n], dict(model.named_parameters())[n]) for n in trained)
        assert frozen_differs  # (seed 1: another base)

    ids = batch.input_ids
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=batch.attention_mask).logits
        merged = m.merge(model)
        assert not hasattr(merged, "peft_config")
        got = merged.eval()(input_ids=ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert isinstance(m.memory_advice(), list) and m.describe().startswith(method)
