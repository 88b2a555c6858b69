"""What each method trains, and how trained weights are saved and restored (RELIABILITY 10-12)."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError, ModelError
from tunelab.models.methods import count_parameters, get_method
from tunelab.models.methods.lora import merge_and_unload
from tunelab.testing import tiny_model, tiny_tokenizer


# The method objects, called the way these tests read best.
def apply_method(model, cfg):
    return get_method(cfg).apply(model)


def save_trained(model, cfg, folder):
    get_method(cfg).save(model, folder)


def load_trained_into(model, cfg, folder):
    get_method(cfg).load(model, folder)


def unfreeze_schedule(model, cfg, step):
    return get_method(cfg).on_step(model, step)


def trainable_named_parameters(model, cfg=None):
    if cfg is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return get_method(cfg).optimizer_parameters(model)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris.",
    "Translate to French: good morning. Bonjour.",
    "SELECT name FROM users WHERE age > 30;",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("chatml")


@pytest.fixture(scope="module")
def ids(tok):
    rows = [tok(t)["input_ids"][:8] for t in TEXTS]
    return torch.tensor(rows)


def method(name, **kw):
    return MethodConfig(name=name, **kw)


def train(model, ids, steps=3, lr=1e-2, weight_decay=0.1, params=None):
    """A few AdamW steps on the LM loss; returns the last loss."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def layer_params(model, *layers):
    return {
        n for n, _ in model.named_parameters() for i in layers if f".layers.{i}." in n
    }  # fmt: skip


# ---- RELIABILITY 10: frozen is frozen -----------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        method("lora"),
        method("lora", targets="qv", dora=True),
        method("freeze", trainable_layers=1, trainable_modules=["model.norm"]),
    ],
    ids=["lora", "dora-qv", "freeze"],
)
def test_frozen_is_frozen(tok, ids, cfg):
    model = apply_method(tiny_model(tok, layers=3), cfg)
    before = snapshot(model)
    # The optimizer holds every parameter, frozen ones included, with weight decay: a frozen
    # parameter has no grad, so AdamW must leave it bit-identical.
    train(model, ids, steps=3, weight_decay=0.1)
    after = snapshot(model)
    trained = trainable(model)
    assert trained and len(trained) < len(before)
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"


# ---- RELIABILITY 11: adapters round-trip --------------------------------------------------------


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("llama", method("lora")),
        ("qwen2", method("lora", targets="attention", rslora=True, r=8)),
        ("gemma", method("lora", targets="qv", dora=True, alpha=8)),
        # an adapter on the tied output layer: merging must not change the input embedding
        ("llama", method("lora", targets=["q_proj", "lm_head"])),
    ],
    ids=["llama-lora", "qwen2-rslora", "gemma-dora", "llama-tied-lm_head"],
)
def test_adapter_round_trip(tok, ids, tmp_path, arch, cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_logits = logits(tiny_model(tok, arch=arch), ids)
    model = apply_method(tiny_model(tok, arch=arch), cfg)
    train(model, ids, steps=4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapter is not a no-op
    ours = logits(model, ids)
    assert not torch.allclose(ours, base_logits, atol=1e-4)
    save_trained(model, cfg, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = apply_method(tiny_model(tok, arch=arch), cfg)
    assert not torch.equal(logits(fresh, ids), ours)
    load_trained_into(fresh, cfg, tmp_path / "adapter")
    assert torch.equal(logits(fresh, ids), ours)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n

    peft_loaded = PeftModel.from_pretrained(tiny_model(tok, arch=arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_loaded, ids), ours, atol=1e-6, rtol=0)

    merged = merge_and_unload(fresh)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), ours, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, ids), ours, atol=1e-5, rtol=0)


def test_merge_and_unload_leaves_plain_models_alone(tok):
    model = tiny_model(tok)
    assert merge_and_unload(model) is model


@pytest.mark.parametrize(
    "cfg",
    [method("full"), method("freeze", trainable_layers=1, trainable_modules=["lm_head"])],
    ids=["full", "freeze"],
)
def test_full_and_freeze_round_trip(tok, ids, tmp_path, cfg):
    model = apply_method(tiny_model(tok), cfg)
    train(model, ids, steps=3)
    ours = logits(model, ids)
    save_trained(model, cfg, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the caller writes it

    fresh = apply_method(tiny_model(tok, seed=1), cfg)  # other weights, so loading must work
    assert not torch.equal(logits(fresh, ids), ours)
    load_trained_into(fresh, cfg, tmp_path / "out")
    assert torch.equal(logits(fresh, ids), ours)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    # the tie survives loading
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_load_errors_name_the_folder(tok, ids, tmp_path):
    with pytest.raises(ModelError, match="found: no such folder"):
        load_trained_into(tiny_model(tok), method("full"), tmp_path / "nothing")
    lora = apply_method(tiny_model(tok), method("lora", r=4))
    with pytest.raises(ModelError, match="no adapter file"):
        load_trained_into(lora, method("lora", r=4), tmp_path)
    save_trained(lora, method("lora", r=4), tmp_path / "r4")
    other_rank = apply_method(tiny_model(tok), method("lora", r=8))
    with pytest.raises(ModelError, match="does not fit"):
        load_trained_into(other_rank, method("lora", r=8), tmp_path / "r4")
    qv = method("lora", r=4, targets="qv")
    fewer_targets = apply_method(tiny_model(tok), qv)
    with pytest.raises(ModelError, match=r"do not match.*unexpected \['base_model"):
        load_trained_into(fewer_targets, qv, tmp_path / "r4")
    save_trained(fewer_targets, qv, tmp_path / "qv")
    with pytest.raises(ModelError, match=r"do not match the model: missing \['base_model"):
        load_trained_into(apply_method(tiny_model(tok), method("lora", r=4)), qv, tmp_path / "qv")


# ---- freeze -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_freeze_trains_exactly_the_last_layers_and_named_modules(tok, arch):
    model = apply_method(
        tiny_model(tok, arch=arch, layers=4),
        method("freeze", trainable_layers=2, trainable_modules=["model.norm"]),
    )
    assert trainable(model) == layer_params(model, 2, 3) | {"model.norm.weight"}
    n_train, n_total = count_parameters(model)
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train < n_total


def test_freeze_lm_head_trains_the_tied_embedding(tok):
    model = tiny_model(tok, layers=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    model = apply_method(model, method("freeze", trainable_layers=0, trainable_modules=["lm_head"]))
    # named_parameters lists the shared tensor once, under the embedding's name
    assert trainable(model) == {"model.embed_tokens.weight"}


def test_freeze_config_errors(tok):
    with pytest.raises(ConfigError, match="has 2 transformer layers"):
        apply_method(tiny_model(tok), method("freeze", trainable_layers=3))
    with pytest.raises(ConfigError, match="'lm_haed'.*lm_head"):
        apply_method(tiny_model(tok), method("freeze", trainable_modules=["lm_haed"]))
    with pytest.raises(ConfigError, match="trains nothing"):
        apply_method(tiny_model(tok), method("freeze", trainable_layers=0))


@pytest.mark.parametrize("every,per", [(3, 1), (2, 2)])
def test_progressive_unfreezing(tok, every, per):
    layers = 5
    cfg = method("freeze", trainable_layers=1, unfreeze_every=every, unfreeze_layers=per)
    model = apply_method(tiny_model(tok, layers=layers), cfg)
    states = {}
    for step in range(20):
        newly = unfreeze_schedule(model, cfg, step)
        n = min(layers, 1 + (step // every) * per)
        expected = layer_params(model, *range(layers - n, layers))
        assert trainable(model) == expected, step
        prev = states.get(step - 1, layer_params(model, layers - 1))
        assert set(newly) == expected - prev, step
        assert bool(newly) == (step > 0 and step % every == 0 and len(prev) < len(expected))
        states[step] = expected
    assert states[19] == layer_params(model, *range(layers))

    # A resumed run recomputes the same state from the step alone.
    for step in (0, every, 2 * every + 1, 19):
        resumed = apply_method(tiny_model(tok, layers=layers), cfg)
        unfreeze_schedule(resumed, cfg, step)
        assert trainable(resumed) == states[step]


def test_unfreeze_schedule_is_a_no_op_without_a_schedule(tok):
    model = apply_method(tiny_model(tok, layers=3), method("freeze", trainable_layers=1))
    assert unfreeze_schedule(model, method("freeze", trainable_layers=1), 1000) == []
    assert trainable(model) == layer_params(model, 2)
    lora = apply_method(tiny_model(tok), method("lora"))
    before = trainable(lora)
    assert unfreeze_schedule(lora, method("lora", unfreeze_every=1), 10) == []
    assert trainable(lora) == before


def test_progressive_unfreezing_with_one_optimizer(tok, ids):
    """The optimizer is built once over every parameter that can become trainable; a layer is
    untouched (weight decay included) until the schedule unfreezes it, then it trains."""
    cfg = method("freeze", trainable_layers=1, unfreeze_every=2, unfreeze_layers=1)
    model = apply_method(tiny_model(tok, layers=3), cfg)
    params = trainable_named_parameters(model, cfg)
    assert [n for n, _ in params] == sorted(layer_params(model, 0, 1, 2), key=list(
        dict(model.named_parameters())).index)  # fmt: skip
    assert trainable_named_parameters(model) == [
        (n, p) for n, p in params if n in layer_params(model, 2)
    ]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.1)
    start = snapshot(model)
    history = []
    for step in range(4):
        unfreeze_schedule(model, cfg, step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(snapshot(model))
    layer0, layer1 = layer_params(model, 0), layer_params(model, 1)
    for name in layer0 | {"model.embed_tokens.weight"}:
        assert torch.equal(history[-1][name], start[name]), name  # never unfrozen by step 3
    for name in layer1:
        assert torch.equal(history[1][name], start[name]), name  # frozen at steps 0 and 1
        assert not torch.equal(history[2][name], start[name]), name  # unfrozen at step 2


# ---- LoRA targets and flags ---------------------------------------------------------------------


def adapted(model):
    return {n.split("base_model.model.", 1)[1] for n, m in model.named_modules() if
            hasattr(m, "lora_A") and "default" in m.lora_A}  # fmt: skip


@pytest.mark.parametrize(
    "targets,names",
    [
        ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("qv", ["q_proj", "v_proj"]),
        (["down_proj", "k_proj"], ["down_proj", "k_proj"]),
        ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)  # fmt: skip
def test_lora_targets(tok, targets, names):
    model = apply_method(tiny_model(tok), method("lora", targets=targets))
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
    expected = {f"model.layers.{i}.{parents[n]}.{n}" for i in range(2) for n in names}
    assert adapted(model) == expected  # all-linear leaves lm_head alone
    assert trainable(model) == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_bad_target_names_the_available_modules(tok):
    with pytest.raises(ConfigError) as err:
        apply_method(tiny_model(tok), method("lora", targets=["q_proj", "query"]))
    message = str(err.value)
    assert "'query'" in message and "'q_proj'" not in message
    for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
        assert name in message
    with pytest.raises(ConfigError, match="empty"):
        apply_method(tiny_model(tok), method("lora", targets=[]))


def test_lora_settings_reach_peft(tok):
    plain = apply_method(tiny_model(tok), method("lora", r=8, dropout=0.05))
    config = plain.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16.0, 0.05)
    assert not config.use_rslora and not config.use_dora
    q_proj = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(2.0)  # alpha / r

    rs = apply_method(tiny_model(tok), method("lora", r=4, alpha=8, rslora=True, dora=True))
    config = rs.peft_config["default"]
    assert config.use_rslora and config.use_dora
    q_proj = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert any("lora_magnitude_vector" in n for n in trainable(rs))


def test_qlora_needs_a_quantised_model(tok):
    with pytest.raises(ConfigError, match="not quantised"):
        apply_method(tiny_model(tok), method("qlora"))
    eight_bit = tiny_model(tok)
    eight_bit.is_loaded_in_8bit = True
    with pytest.raises(ConfigError, match="loaded in 8-bit"):
        apply_method(eight_bit, method("qlora", bits=4))
    for name in ("full", "freeze"):
        with pytest.raises(ConfigError, match="cannot train a quantised"):
            apply_method(eight_bit, method(name))


def test_qlora_wiring(tok, ids):
    """The qlora path (kbit preparation, then LoRA) on a model flagged as 4-bit: the real
    bitsandbytes path needs CUDA and is covered by the gpu tests."""
    model = tiny_model(tok)
    model.is_loaded_in_4bit = True
    peft_model = apply_method(model, method("qlora", targets="qv"))
    assert trainable(peft_model) == {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert len(adapted(peft_model)) == 4


# ---- counting and RELIABILITY 12: overfit sanity ------------------------------------------------


def test_count_parameters(tok):
    model = tiny_model(tok)
    unique = {id(p): p.numel() for p in model.parameters()}
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == (sum(unique.values()), sum(unique.values()))
    assert sum(unique.values()) < every  # the tied embedding counts once
    lora = apply_method(model, method("lora", targets="attention", r=16))
    # r * (in + out) per adapted linear: q 64->64, k 64->32, v 64->32, o 64->64; 2 layers
    lora_params = 2 * 16 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert count_parameters(lora) == (lora_params, sum(unique.values()) + lora_params)


@pytest.mark.parametrize(
    "cfg,lr",
    [
        (method("full"), 3e-3),
        (method("freeze", trainable_layers=1, trainable_modules=["lm_head"]), 1e-2),
        # The frozen, tied output layer of a random 64-wide model bounds the logits near +-1, so
        # memorising needs an adapter on lm_head (real models have far larger embeddings).
        (method("lora", targets=["q_proj", "v_proj", "lm_head"]), 1e-2),
    ],
    ids=["full", "freeze", "lora"],
)
def test_overfit_sanity(tok, ids, cfg, lr):
    torch.manual_seed(0)
    model = apply_method(tiny_model(tok), cfg)
    params = [p for _, p in trainable_named_parameters(model, cfg)]
    loss = train(model, ids, steps=60, lr=lr, weight_decay=0.0, params=params)
    assert loss < 0.05
