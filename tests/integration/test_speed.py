"""What the speed work must not change: bf16 training keeps the loss of fp32 training (within
1 % over 100 steps), ``auto`` records what it chose and why."""

import json
import statistics

from tests.integration.runs import config, losses, quiet
from tunelab.models.attention import NAME as MATMUL
from tunelab.workflow.finetune import finetune
from tunelab.workflow.quote import make_quote


def test_bf16_training_keeps_loss_parity_with_fp32(tmp_path, model_dir, data_file):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = config(tmp_path / precision, model_dir, data_file, f"model.precision={precision}",
                     "train.max_steps=100", "train.eval_steps=50", "train.save_steps=100")  # fmt: skip
        runs[precision] = finetune(cfg, log=quiet)
    fp32, bf16 = ([r["loss"] for r in losses(runs[p])] for p in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 100
    drift = statistics.mean(abs(a - b) / a for a, b in zip(fp32, bf16, strict=True))
    assert 0 < drift < 0.01, drift  # bf16 really ran (not bit-identical) and stayed close
    assert fp32[-1] < 0.95 * fp32[0]  # over a curve that moves
    result = json.loads((runs["bf16"] / "result.json").read_text())
    assert result["precision"] == "bf16" and result["attention"] == MATMUL  # short, on a CPU


def test_lora_under_autocast_skips_peft_casts_and_changes_no_number(tmp_path, model_dir, data_file):
    """The bf16 step leaves casting to autocast (PEFT's copy of each LoRA input to fp32 and back
    is skipped): the same loss and gradients to the bit, and the flag restored afterwards."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tunelab.models.tokenizer import pad_id
    from tunelab.train.plan import build_plan
    from tunelab.train.recipe import load

    plan = build_plan(config(tmp_path, model_dir, data_file, "model.precision=bf16"))
    model = plan.method.apply(load(plan))
    assert plan.attention == MATMUL and model.config._attn_implementation == MATMUL
    batch = plan.objective.collate(plan.train[:4], pad_id(plan.tokenizer))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    results = []
    for context in (
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),  # PEFT casting as it comes
        lambda: plan.autocast(model),
    ):
        model.zero_grad()
        with context():
            flags = {getattr(m, "cast_input_dtype_enabled", True) for m in layers}
            loss = plan.objective.loss_sum(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((flags, loss.detach(), grads))
    (before, l1, g1), (inside, l2, g2) = results
    assert before == {True} and inside == {False}
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)  # restored
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_eager_cpu_training_writes_out_the_norms_and_compiled_leaves_them(
    tmp_path, model_dir, data_file
):
    from tunelab.train.plan import build_plan
    from tunelab.train.recipe import load

    for setting, written in (("off", 2 * 2 + 1), ("on", 0)):  # 2 layers: two each + the last
        plan = build_plan(config(tmp_path / setting, model_dir, data_file,
                                 f"train.compile={setting}"), read_weights=False)  # fmt: skip
        model = load(plan)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert sum("forward" in m.__dict__ for m in norms) == written, setting


def test_compiled_layers_train_as_the_eager_ones(tmp_path, model_dir, data_file, monkeypatch):
    """train.compile=on (each decoder layer compiled in place) gives the eager run's losses and
    weights, and its checkpoints keep the parameter names. It compiles one graph, once: the
    frozen embeddings' first layer stays eager, validation runs the eager code, floats are not
    traced as symbols (no restarted trace). Afterwards the graph is marked as cached: auto's
    next decision for the same graph weighs the cached cost."""
    import statistics

    import torch
    import torch._dynamo.utils as dynamo

    from tests.integration.runs import final_weights
    from tunelab.train.plan import build_plan
    from tunelab.train.speed import measured_rates

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # this test's own
    runs = {}
    for setting in ("off", "on"):
        cfg = config(tmp_path / setting, model_dir, data_file, f"train.compile={setting}",
                     "train.max_steps=3", "model.precision=fp32")  # fmt: skip
        torch._dynamo.reset()
        dynamo.counters.clear()
        dynamo.compilation_time_metrics.clear()
        runs[setting] = finetune(cfg, log=quiet)
    eager, compiled = ([r["loss"] for r in losses(runs[s])] for s in ("off", "on"))
    assert compiled == __import__("pytest").approx(eager, rel=1e-4)
    a, b = final_weights(runs["off"]), final_weights(runs["on"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    assert json.loads((runs["on"] / "result.json").read_text())["compiled"] is True
    # validations at steps 0 and 2, then training: one graph, traced once
    assert dynamo.counters["stats"]["unique_graphs"] == 1, dict(dynamo.counters["stats"])
    assert "compile_attempt_1" not in dynamo.compilation_time_metrics  # no restart
    for method_r in (4, 8):  # the same graph, and another LoRA rank's
        cfg = config(tmp_path / f"auto-{method_r}", model_dir, data_file, "model.precision=fp32",
                     f"method.r={method_r}")  # fmt: skip
        plan = build_plan(cfg, read_weights=False)
        decision = plan.compile
        assert decision[0] is False, decision  # a tiny model's few seconds: never worth it
        assert ("compiled before" in decision[1]) is (method_r == 4), decision
        assert ("measured here" in decision[1]) is (method_r == 4), decision
        rates = measured_rates(plan.compile_key)  # each run's steady FLOP/s
        assert list(rates) == (["eager", "compiled"] if method_r == 4 else []), rates
        if method_r == 4:  # each the median real tokens/s after step 1 x FLOPs per token
            for setting, kind in (("off", "eager"), ("on", "compiled")):
                steps = [r["tokens_per_s"] for r in losses(runs[setting])]
                expected = statistics.median(steps[1:]) * plan.flops_per_token()
                assert rates[kind] == round(expected), (kind, steps)
        assert make_quote(cfg).compile == decision  # tunelab plan says what train will do


def test_compile_auto_weighs_the_seconds_it_saves_against_its_cost(tmp_path, monkeypatch):
    """auto estimates the run's eager seconds from its FLOPs: cold, the saving must repay the
    compilation over this run and the next (which finds the graph cached); with the graph's
    marker in the inductor cache, within this run. A GPU needs more work to pay."""
    import shutil

    from tunelab.train.speed import (
        COMPILE_COST_S,
        COMPILE_SAVES,
        EAGER_FLOPS,
        choose_compile,
        remember_compiled,
    )

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # docs/speed.md: ~180 GFLOP/s eager, 29 % saved, ~48 s cold and ~5 s cached on this CPU
    assert (EAGER_FLOPS["cpu"], COMPILE_SAVES["cpu"], COMPILE_COST_S["cpu"]) == (
        180e9,
        0.29,
        (48, 5),
    )

    def seconds(s):  # the training FLOPs of s eager seconds on a CPU
        return s * EAGER_FLOPS["cpu"]

    assert choose_compile("off", seconds(1e6)) == (False, "")
    assert choose_compile("auto", None, "cpu", "k")[0] is False  # a model tunelab cannot size
    if not (shutil.which("c++") or shutil.which("g++")):
        return
    assert choose_compile("on", seconds(0))[0] is True
    # cold: 2 x 0.29 x s >= 48 + 5 from s = 91.4
    assert choose_compile("auto", seconds(91), "cpu", "k")[0] is False
    assert choose_compile("auto", seconds(92), "cpu", "k") == (
        True, "compile: auto: on (~92 s of eager steps at ~180 GFLOP/s, ~27 s saved; ~48 s cold, repaid over two runs)")  # fmt: skip
    assert choose_compile("auto", seconds(92), "cuda", "k")[0] is False
    # cached: 0.29 x s >= 5 from s = 17.2
    assert choose_compile("auto", seconds(18), "cpu", "k")[0] is False
    remember_compiled("k")
    assert (tmp_path / "inductor" / "tunelab-compiled" / "k").is_file()
    assert choose_compile("auto", seconds(17), "cpu", "k")[0] is False
    assert choose_compile("auto", seconds(18), "cpu", "k") == (
        True, "compile: auto: on (~18 s of eager steps at ~180 GFLOP/s, ~5 s saved; ~5 s to load, compiled before)")  # fmt: skip
    assert choose_compile("auto", seconds(18), "cpu", "other")[0] is False
    # two attentions, two graphs: cold 2 x 0.29 x s >= 68 + 10 from s = 134.5; cached from 34.5
    assert choose_compile("auto", seconds(134), "cpu", "two", graphs=2)[0] is False
    assert choose_compile("auto", seconds(135), "cpu", "two", graphs=2) == (
        True, "compile: auto: on (~135 s of eager steps at ~180 GFLOP/s, ~39 s saved; ~68 s cold for 2 graphs (two attentions), repaid over two runs)")  # fmt: skip
    remember_compiled("two")
    assert choose_compile("auto", seconds(34), "cpu", "two", graphs=2)[0] is False
    assert choose_compile("auto", seconds(35), "cpu", "two", graphs=2)[0] is True


def test_compile_auto_decides_by_the_rates_this_machine_measured(tmp_path, monkeypatch):
    """Runs of a layer graph record their steady FLOP/s, eager and compiled; auto's estimate
    then takes them instead of its assumptions (~180 GFLOP/s eager, 29 % saved): a machine
    twice as fast eager finds a cold compile no longer worth it for the same run."""
    import shutil

    from tunelab.train.speed import choose_compile, measured_rates, remember_rate

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    if not (shutil.which("c++") or shutil.which("g++")):
        return
    flops = 100 * 180e9  # ~100 s eager at the assumed rate: cold compile pays (2 x 29 >= 53)
    assert choose_compile("auto", flops, "cpu", "g")[0] is True
    remember_rate("g", compiled=False, flops_per_s=360e9)  # an eager run measured 2x faster
    assert measured_rates("g") == {"eager": 360e9}
    assert choose_compile("auto", flops, "cpu", "g") == (
        False, "compile: auto: off (~50 s of eager steps at ~360 GFLOP/s measured here, ~14 s saved; ~48 s cold, repaid over two runs)")  # fmt: skip
    remember_rate("g", compiled=True, flops_per_s=400e9)  # compiled: 10 % less time, not 29 %
    assert measured_rates("g") == {"eager": 360e9, "compiled": 400e9}
    assert "~5 s saved" in choose_compile("auto", flops, "cpu", "g")[1]  # 50 - 45 s
    remember_rate("c", compiled=True, flops_per_s=300e9 / 0.71)  # compiled alone: the eager
    assert choose_compile("auto", flops, "cpu", "c") == (  # rate implied at the 29 % saving
        False, "compile: auto: off (~60 s of eager steps at ~300 GFLOP/s from compiled steps measured here, ~17 s saved; ~48 s cold, repaid over two runs)")  # fmt: skip
    (tmp_path / "inductor" / "tunelab-compiled" / "g.rates.json").write_text('{"eager": "x"}')
    assert measured_rates("g") == {}  # unreadable: the assumptions again
    assert choose_compile("auto", flops, "cpu", "g")[0] is True


def test_compile_layers_compiles_every_decoder_layer_in_place(tmp_path, model_dir, data_file):
    from tunelab.train.plan import build_plan
    from tunelab.train.recipe import compile_layers, load

    plan = build_plan(config(tmp_path, model_dir, data_file))
    model = plan.method.apply(load(plan))
    names = [n for n, _ in model.named_parameters()]
    compile_layers(model)
    layers = model.get_base_model().get_decoder().layers
    # LoRA: the first layer's input carries no gradient, a graph of its own: left eager
    assert [layer._compiled_call_impl is not None for layer in layers] == [False, True]
    assert [n for n, _ in model.named_parameters()] == names
    full = build_plan(config(tmp_path / "full", model_dir, data_file, "method.name=full"))
    model = full.method.apply(load(full))
    compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.get_decoder().layers)


def test_forgetting_check_compares_like_with_like_when_training_picks_bf16(
    tmp_path, model_dir, data_file, monkeypatch
):
    """auto may train in bf16 on a CPU while evaluation stays fp32: the "before" of the
    forgetting check is then the base loaded as evaluation loads it, not the bf16 model in
    memory."""
    import tunelab.workflow.finetune as workflow
    from tunelab.models import device

    loaded = []
    real = workflow.load_target
    monkeypatch.setattr(workflow, "load_target", lambda *a: loaded.append(a[0]) or real(*a))
    for picks in ("fp32", "bf16"):
        monkeypatch.setattr(device, "cpu_training_precision", lambda hidden, p=picks: (p, "test"))
        loaded.clear()
        cfg = config(tmp_path / picks, model_dir, data_file, "train.max_steps=1", "eval.at_end=true",
                     f"eval.general_data={data_file}", "eval.max_new_tokens=4")  # fmt: skip
        run = finetune(cfg, log=quiet)
        assert json.loads((run / "result.json").read_text())["precision"] == picks
        before = [name for name in loaded if name == str(model_dir)]
        assert len(before) == (1 if picks == "bf16" else 0)  # the base reloaded only for bf16


def test_packed_training_follows_the_padded_run(tmp_path, model_dir, data_file, monkeypatch):
    """train.packing=on (each micro-batch one row) trains the same run as padded batches, eager
    and with its layers compiled (the varlen attention traced, its per-forward mask cache left
    alone): the same losses step by step to rounding, and result.json says it packed."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # this test's own
    runs = {}
    for name, packing, compiled in (("off", "off", "off"), ("on", "on", "off"),
                                    ("compiled", "on", "on")):  # fmt: skip
        cfg = config(tmp_path / name, model_dir, data_file, f"train.packing={packing}",
                     f"train.compile={compiled}", "model.precision=fp32")  # fmt: skip
        runs[name] = finetune(cfg, log=quiet)
    padded, packed, compiled = ([r["loss"] for r in losses(runs[p])] for p in runs)
    assert len(packed) == 6 and packed[-1] != packed[0]
    for a, b, c in zip(padded, packed, compiled, strict=True):
        assert abs(a - b) <= 1e-4 * a and abs(a - c) <= 1e-4 * a, (padded, packed, compiled)
    result = json.loads((runs["on"] / "result.json").read_text())
    assert result["packed"] is True
    from tunelab.train.plan import build_plan

    plan = build_plan(config(tmp_path / "plan", model_dir, data_file, "train.packing=on"))
    batch = plan.objective.collate(plan.train[:2], 0)
    assert batch.packed and batch.input_ids.shape[0] == 1
    assert json.loads((runs["off"] / "result.json").read_text())["packed"] is False


def test_the_plan_quotes_a_packed_runs_compile_as_train_decides_it(
    tmp_path, model_dir, data_file, monkeypatch
):
    """train.packing=on on a CPU trains through the varlen attention, a graph of its own:
    `tunelab plan` weighs that graph's cache, not the padded attention's."""
    from tunelab.models import varlen
    from tunelab.train.plan import build_plan
    from tunelab.train.speed import remember_compiled

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = config(tmp_path, model_dir, data_file, "train.packing=on", "model.precision=fp32")
    plan = build_plan(cfg, read_weights=False)
    assert plan.attention == varlen.NAME
    remember_compiled(plan.compile_key)
    decision = build_plan(cfg, read_weights=False).compile
    assert "compiled before" in decision[1], decision
    assert make_quote(cfg).compile == decision


def test_on_a_cpu_each_micro_batch_gets_the_attention_of_its_width(
    tmp_path, model_dir, data_file, monkeypatch
):
    """Rows longer than MATMUL_MAX_LEN somewhere in the data: the plan says <matmul>+sdpa, and
    each forward picks matmuls for a narrow micro-batch and SDPA for a wide one (the field
    every attention layer reads), with the same loss either way."""
    import torch

    import tunelab.models.device as device
    from tunelab.train.plan import build_plan
    from tunelab.train.recipe import load

    plain = build_plan(config(tmp_path / "a", model_dir, data_file, "model.precision=fp32"))
    by_length = sorted(plain.train, key=lambda t: len(t.seq))
    short, long = by_length[:2], by_length[-2:]
    assert len(short[-1].seq) < len(long[0].seq)
    monkeypatch.setattr(device, "MATMUL_MAX_LEN", len(short[-1].seq))
    plan = build_plan(config(tmp_path / "b", model_dir, data_file, "model.precision=fp32"))
    assert plan.attention == f"{MATMUL}+sdpa"
    assert "for 2 graphs (two attentions)" in plan.compile[1], plan.compile  # auto's cost
    assert "graphs" not in plain.compile[1], plain.compile
    model = plan.method.apply(load(plan))
    seen = []
    layer = model.get_base_model().model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    losses = {}
    for name, examples in (("short", short), ("long", long), ("short again", short)):
        with torch.no_grad():
            losses[name] = plan.objective.loss_sum(model, plan.objective.collate(examples, 0))
    assert seen == [MATMUL, "sdpa", MATMUL]
    reference = plain.method.apply(load(plain))  # no hook: SDPA for every batch
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():
        sdpa = plain.objective.loss_sum(reference, plain.objective.collate(short, 0))
    torch.testing.assert_close(losses["short"], sdpa, rtol=1e-5, atol=1e-6)


def test_bf16_on_a_cpu_pads_batch_widths_to_a_multiple_and_keeps_the_loss(
    tmp_path, model_dir, data_file
):
    """bf16 on a CPU: every training batch is padded to a multiple of CPU_BF16_PAD columns
    (fewer oneDNN kernel shapes); the padding changes no loss. fp32 keeps exact widths."""
    import torch

    from tunelab.train.plan import build_plan
    from tunelab.train.speed import CPU_BF16_PAD, pad_multiple

    assert pad_multiple("cpu", "fp32") is None and pad_multiple("cuda", "bf16") is None
    bf16 = build_plan(config(tmp_path / "bf16", model_dir, data_file, "model.precision=bf16"))
    fp32 = build_plan(config(tmp_path / "fp32", model_dir, data_file, "model.precision=fp32"))
    examples = bf16.train[:3]
    wide = bf16.objective.collate(examples, 0)
    exact = fp32.objective.collate(examples, 0)
    assert wide.input_ids.shape[1] % CPU_BF16_PAD == 0
    assert exact.input_ids.shape[1] == max(len(t.seq) for t in examples) < wide.input_ids.shape[1]
    from tunelab.train.recipe import load

    model = fp32.method.apply(load(fp32))
    with torch.no_grad():
        a, b = (fp32.objective.loss_sum(model, batch) for batch in (exact, wide))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert wide.num_tokens == exact.num_tokens  # padding is not counted as tokens


def test_a_token_budget_trains_the_same_run_in_fewer_forwards(tmp_path, model_dir, data_file):
    """train.micro_batch_tokens regroups each step's sequences into fewer micro-batches: the
    same losses and the same trained weights as the fixed micro-batches (accumulation is exact),
    fewer forward passes; a preference objective refuses it."""
    import pytest

    from tests.integration.runs import final_weights
    from tunelab.errors import ConfigError
    from tunelab.models.nll import FusedHeadNLL
    from tunelab.train.plan import build_plan

    runs, forwards = {}, {}
    original = FusedHeadNLL.forward
    for budget in ("null", "100000"):
        calls = []
        FusedHeadNLL.forward = staticmethod(  # training forwards only (not validation's)
            lambda *a, c=calls: (a[-1] or a[-2]) and c.append(1) or original(*a)
        )
        try:
            cfg = config(tmp_path / budget, model_dir, data_file, f"train.micro_batch_tokens={budget}",
                         "model.precision=fp32", "train.eval_steps=100")  # fmt: skip
            runs[budget] = finetune(cfg, log=quiet)
        finally:
            FusedHeadNLL.forward = original
        forwards[budget] = len(calls)
    fixed, budgeted = ([r["loss"] for r in losses(runs[b])] for b in ("null", "100000"))
    assert len(fixed) == 6 and fixed[-1] != fixed[0]
    for a, b in zip(fixed, budgeted, strict=True):
        assert abs(a - b) <= 1e-5 * a, (fixed, budgeted)
    w1, w2 = final_weights(runs["null"]), final_weights(runs["100000"])
    for name in w1:
        assert (w1[name] - w2[name]).abs().max() <= 1e-5, name
    assert forwards["100000"] * 2 == forwards["null"] == 12  # 6 steps of 2 x 2, then of 1 x 4
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"Boxes in order {i}?", "chosen": f"{i} boxes.",
                                            "rejected": "Hard to say."}) for i in range(16)))  # fmt: skip
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        build_plan(config(tmp_path / "dpo", model_dir, pairs, "train.micro_batch_tokens=64",
                          "train.objective=dpo"), read_weights=False)  # fmt: skip
    auto = build_plan(config(tmp_path / "dpo-auto", model_dir, pairs, "train.micro_batch_tokens=auto",
                             "train.objective=dpo"), read_weights=False)  # fmt: skip
    assert auto.steps.max_tokens is None  # auto: where it applies (pairs stay in their rows)


def test_the_cli_keeps_compiled_graphs_in_tunelabs_cache_though_transformers_set_another(
    tmp_path,
):
    """Importing transformers makes torch fix TORCHINDUCTOR_CACHE_DIR at a /tmp default; the
    tunelab command sets its own cache first, so `train` compiles, marks and measures where
    `tunelab plan` (which imports no torch) looks."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TUNELAB_HOME"] = str(tmp_path)
    code = "import os, tunelab.cli, transformers; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "inductor"), out.stderr[-2000:]
