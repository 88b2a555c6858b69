"""Preference objectives in the whole recipe, on a tiny model: every objective x method trains,
saves, reloads and resumes bit-identically; the reference model is never updated and costs no
second copy with LoRA; a finished SFT run is a starting point; per-step losses are pinned."""

import json

import pytest
import torch

from tests.integration.runs import Interrupted, config, final_weights, halt_after, losses, quiet
from tunelab.config.load import load_config
from tunelab.models.run_folder import load_run
from tunelab.models.shape import model_shape
from tunelab.models.tokenizer import pad_id
from tunelab.train import reference
from tunelab.train.objectives.pairs import score
from tunelab.train.plan import build_plan, sequence_stats
from tunelab.train.recipe import prepare, train
from tunelab.workflow.finetune import finetune

OBJECTIVES = ["dpo", "kto", "simpo", "orpo"]
METHODS = {"full": (), "freeze": ("method.trainable_layers=1",), "lora": ()}
STATS = ("chosen_reward", "rejected_reward", "margin")


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"How many boxes are in order {i}?", "chosen": f"{i * 7} boxes.",
             "rejected": f"Maybe {i * 3} boxes, or more, it is hard to say really."}
            for i in range(16)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    rows = [{"instruction": f"How many boxes are in order {i}?",
             "output": f"{i * 7} boxes." if i % 3 else "I could not say.", "kto_tag": i % 3 != 0}
            for i in range(16)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _cfg(tmp_path, model_dir, objective, files, *extra):
    data = files[1] if objective == "kto" else files[0]
    return config(tmp_path, model_dir, data, f"train.objective={objective}", *extra)


@pytest.fixture
def files(pair_file, kto_file):
    return pair_file, kto_file


# -- the contract: every objective x method ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_trains_saves_reloads_and_resumes_exactly(tmp_path, model_dir, files, objective, method):
    extra = (f"method.name={method}", "train.max_steps=5", "train.warmup_steps=1", *METHODS[method])
    full = finetune(_cfg(tmp_path / "a", model_dir, objective, files, *extra), log=quiet)
    with pytest.raises(Interrupted):
        finetune(_cfg(tmp_path / "b", model_dir, objective, files, *extra), log=quiet,
                 progress=halt_after(2))  # fmt: skip
    cut = tmp_path / "b" / "run"
    resumed = finetune(load_config(cut / "config.yaml"), resume=cut, log=quiet)
    assert json.loads((resumed / "result.json").read_text())["resumed_from"] == 2

    a, b = losses(full), losses(resumed)
    keys = ("step", "loss", "order", *STATS)
    assert [tuple(r.get(k) for k in keys) for r in a] == [tuple(r.get(k) for k in keys) for r in b]
    assert a[-1]["loss"] != a[0]["loss"] and all(any(k in r for k in STATS) for r in a)
    wa, wb = final_weights(full), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    base = final_weights(model_dir, folder=".")
    if method == "freeze":  # layer 0 is frozen: bit-identical to the model it started from
        frozen = [k for k in base if ".layers.0." in k]
        assert frozen and all(torch.equal(wa[k], base[k]) for k in frozen)
    loaded = load_run(full)  # the final weights reload as a model
    trained = dict(loaded.model.named_parameters())
    assert any(not torch.equal(trained[k], base[k]) for k in base if k in trained)


# -- the reference model -----------------------------------------------------------------------
def _val_rows(plan):
    return plan.objective.collate(plan.val[:4], pad_id(plan.tokenizer))


@pytest.mark.parametrize("setting", ["lora-adapter-off", "full-frozen-copy"])
def test_the_reference_is_never_updated(tmp_path, model_dir, files, setting):
    method, precompute = {
        "lora-adapter-off": ("lora", "false"),
        "full-frozen-copy": ("full", "false"),
    }[setting]
    plan = build_plan(_cfg(tmp_path, model_dir, "dpo", files, f"method.name={method}", "train.lr=1e-2",
                           f"train.preference.precompute_ref={precompute}"))  # fmt: skip
    run = prepare(plan, log=quiet)
    rows = _val_rows(plan)
    with torch.no_grad():
        before = plan.objective.reference(run.model, rows).clone()
        policy_before = score(run.model, rows)[0]
    train(run, log=quiet)
    with torch.no_grad():
        after = plan.objective.reference(run.model, rows)
        policy_after = score(run.model, rows)[0]
    assert not torch.allclose(policy_before, policy_after)  # the policy did move
    assert torch.equal(before, after)


def test_precomputed_reference_is_cached_and_reused_on_resume(
    tmp_path, model_dir, files, monkeypatch
):
    extra = ("method.name=full", "train.max_steps=4", "train.lr=1e-2")
    with pytest.raises(Interrupted):
        finetune(_cfg(tmp_path, model_dir, "dpo", files, *extra), log=quiet, progress=halt_after(2))
    run_dir = tmp_path / "run"
    cache = run_dir / reference.REFERENCE_FILE
    saved = json.loads(cache.read_text())
    base = load_run(str(model_dir)).model  # the untrained model scores the same
    plan = build_plan(load_config(run_dir / "config.yaml"), resume=run_dir)
    rows = plan.objective.collate(plan.train[:3], pad_id(plan.tokenizer))
    with torch.no_grad():
        fresh = score(base, rows)[0].tolist()
    assert [r[0] for r in saved["train"][:3]] + [r[1] for r in saved["train"][:3]] == pytest.approx(
        fresh, abs=1e-4
    )

    def refuse(*a, **k):
        raise AssertionError("the cached reference log-probabilities were computed again")

    monkeypatch.setattr(reference, "compute", refuse)
    finetune(load_config(run_dir / "config.yaml"), resume=run_dir, log=quiet)
    assert json.loads(cache.read_text()) == saved


def _storage_bytes(*modules):
    seen = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_lora_dpo_holds_one_copy_of_the_base(tmp_path, model_dir, files):
    base_bytes = _storage_bytes(load_run(str(model_dir)).model)
    held = {}
    for method, precompute in (("lora", "auto"), ("full", "false")):
        plan = build_plan(_cfg(tmp_path / method, model_dir, "dpo", files, f"method.name={method}",
                               f"train.preference.precompute_ref={precompute}"))  # fmt: skip
        run = prepare(plan, log=quiet)
        copy = getattr(plan.objective.reference, "model", None)
        held[method] = _storage_bytes(run.model, *([copy] if copy is not None else []))
    assert base_bytes < held["lora"] < 1.1 * base_bytes  # the base once, plus small adapters
    assert held["full"] >= 2 * base_bytes  # what a frozen copy costs (what LoRA avoids)


def test_a_reference_scored_every_step_counts_in_the_runs_flops(tmp_path, model_dir, files):
    """What compile auto weighs and each run records as this machine's FLOP/s (train/speed.py):
    a live reference's forward is work the step does, a precomputed one is not."""
    plans = {p: build_plan(_cfg(tmp_path / p, model_dir, "dpo", files,
                                f"train.preference.precompute_ref={p}"), read_weights=False)
             for p in ("false", "true")}  # fmt: skip
    live, cached = (plans[p].flops_per_token() for p in ("false", "true"))
    shape = model_shape(plans["true"].model_config)
    lengths, weighted = sequence_stats(plans["true"].train)
    s_eff = sum(x * x for x in lengths) / sum(lengths)
    forward = 2 * (shape.linear_params + shape.vocab * shape.hidden * weighted)
    assert live - cached == pytest.approx(
        forward + 2 * shape.layers * shape.heads * shape.head_dim * s_eff
    )


# -- continuing from a supervised run ----------------------------------------------------------
def test_dpo_continues_from_a_finished_sft_run(tmp_path, model_dir, data_file, files):
    sft = finetune(config(tmp_path / "sft", model_dir, data_file, "train.lr=1e-2"), log=quiet)
    plan = build_plan(_cfg(tmp_path / "dpo", sft, "dpo", files))
    run = prepare(plan, log=quiet)
    rows = _val_rows(plan)
    sft_model = load_run(sft).model  # the SFT adapter merged into its base
    with torch.no_grad():
        ref = plan.objective.reference(run.model, rows)
        assert torch.allclose(
            ref, score(sft_model, rows)[0], atol=1e-4
        )  # the reference is the SFT model
        assert not torch.allclose(ref, score(load_run(str(model_dir)).model, rows)[0], atol=1e-2)
    finetune(_cfg(tmp_path / "dpo2", sft, "dpo", files, "train.max_steps=2"), log=quiet)


# -- golden values -----------------------------------------------------------------------------
GOLDEN = {  # torch 2.13.0 CPU, fp32, LoRA r4. Step 1 is at the reference: DPO ln 2; KTO 0.5 x the
    # weights (a step of 4 undesirable answers at 10/6); SimPO and ORPO from the model's own logps
    "dpo": [0.6931472, 0.5995435, 0.4967052, 0.4348928, 0.3980091, 0.3823956],
    "kto": [0.8333333, 0.6468698, 0.5089420, 0.4999981, 0.7137266, 0.5809874],
    "simpo": [1.3716331, 1.2291242, 1.0847847, 1.0391617, 0.9893687, 0.9408346],
    "orpo": [6.3587751, 6.2584159, 6.1710854, 6.1085556, 6.0853708, 6.0462964],
}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_per_step_losses_are_pinned(tmp_path, model_dir, files, objective):
    cfg = _cfg(tmp_path, model_dir, objective, files, "data.val_ratio=0", "train.warmup_steps=1",
               "train.save_steps=6", "train.lr=5e-3")  # fmt: skip
    got = [r["loss"] for r in losses(finetune(cfg, log=quiet))]
    assert got == pytest.approx(GOLDEN[objective], rel=2e-5), got


def test_a_preference_run_evaluates_held_out_pairs_at_the_end(tmp_path, model_dir, files):
    cfg = _cfg(tmp_path, model_dir, "dpo", files, "train.max_steps=2", "eval.at_end=true",
               f"eval.data={files[0]}")  # fmt: skip
    run = finetune(cfg, log=quiet)
    meta = json.loads((run / "eval" / "finetuned" / "metrics.json").read_text())
    assert meta["kind"] == "preference" and meta["examples"] == 16
    assert 0.0 <= meta["metrics"]["preference_accuracy"] <= 1.0
    assert "preference_accuracy" in (run / "summary.md").read_text()


def test_the_command_line_trains_a_preference_run_quietly(tmp_path, model_dir, files, capsys):
    from tunelab.cli import main

    code = main(["train", "-q", f"model.name={model_dir}", f"data.path={files[0]}", "data.val_ratio=0.25",
                 "train.objective=dpo", "train.max_steps=2", "train.micro_batch_size=2",
                 f"train.output_dir={tmp_path}", "name=q"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "eval_loss 0.6931 reward accuracy 0.000" in err and "ppl" not in err
    assert "doctor: too_short (doctor.md" in out  # 2 steps: too few to judge
