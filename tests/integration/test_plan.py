"""The run plan (no weights read), train.keep, the schedule's ends, and data SFT refuses."""

import json
from pathlib import Path

import pytest
import torch

from tests.integration.runs import (
    Interrupted,
    config,
    final_weights,
    halt_after,
    losses,
    quiet,
    records,
)
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.train.optim import Schedule
from tunelab.train.plan import build_plan
from tunelab.workflow.finetune import finetune

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_dry_run_prints_the_plan_without_reading_weights(
    tmp_path, model_dir, data_file, no_weights_read, capsys
):
    args = [f"model.name={model_dir}", f"data.path={data_file}", f"train.output_dir={tmp_path}", "name=dry",
            "train.micro_batch_size=2", "train.grad_accum=2", "train.epochs=2", "train.eval_steps=2"]  # fmt: skip
    assert main(["train", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    for expected in ["new run", "(llama, 2 layers, hidden 64", "weights in float32, compute in float32",
                     "lora (r=16", "objective      sft", "14 train / 2 validation", "4 per epoch, 8 in all",
                     "every 2 steps", "final weights  best", "fingerprint"]:  # fmt: skip
        assert expected in out, (expected, out)
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


def test_the_plan_of_a_resume_names_its_checkpoint(tmp_path, model_dir, data_file, capsys):
    cfg = config(tmp_path, model_dir, data_file)
    with pytest.raises(Interrupted):
        finetune(cfg, log=quiet, progress=halt_after(3))
    run = tmp_path / "run"
    plan = build_plan(load_config(run / "config.yaml"), resume=run)
    assert plan.resume_from.name == "step-000003" and not plan.fresh
    assert main(["train", "--dry-run", "--resume", str(run)]) == 0
    assert "resume from step-000003" in capsys.readouterr().out


@pytest.mark.parametrize("name, kind", [("kto.jsonl", "KTO"), ("preferences.jsonl", "preference")])
def test_sft_refuses_preference_and_kto_data_before_any_model_loads(tmp_path, capsys, name, kind):
    code = main(["train", "-q", f"data.path={EXAMPLES / name}", "model.name=./does/not/matter",
                 f"train.output_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{name}:1: format: a {kind}" in err and "train.objective=sft" in err, err
    assert not any(tmp_path.iterdir())


# -- train.keep --------------------------------------------------------------------------------
def _result(run):
    return json.loads((run / "result.json").read_text())


def _checkpoint_weights(run, step):
    return final_weights(run, f"checkpoints/step-{step:06d}/trained")


@pytest.mark.parametrize("keep, save_steps", [("best", 8), ("last", 1)])
def test_final_holds_the_weights_train_keep_names(tmp_path, model_dir, data_file, keep, save_steps):
    """keep=best with checkpoints only at the end: a new best is checkpointed anyway, and
    final/ is that checkpoint; keep=last: final/ is the last step's checkpoint."""
    # a learning rate high enough that the validation loss gets worse again after its best
    run = finetune(config(tmp_path, model_dir, data_file, "method.name=full", "train.lr=0.1",
                          "train.schedule=constant", "train.max_steps=8", "train.eval_steps=1",
                          f"train.save_steps={save_steps}", f"train.keep={keep}"), log=quiet)  # fmt: skip
    result = _result(run)
    evals = {r["step"]: r["eval_loss"] for r in records(run) if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert 0 < best_step < 8, evals  # the test needs a best in the middle
    named = best_step if keep == "best" else 8
    assert result["keep"] == keep and result["final_step"] == named
    wa, wb = final_weights(run), _checkpoint_weights(run, named)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    other = _checkpoint_weights(run, 8 if keep == "best" else best_step)
    assert other.keys() == wa.keys() and any(not torch.equal(wa[k], other[k]) for k in wa)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step == result["best_step"]
    assert f"step {named}" in (run / "summary.md").read_text()


def test_an_untrained_model_can_be_the_best(tmp_path, model_dir, data_file):
    run = finetune(config(tmp_path, model_dir, data_file, "method.name=full", "train.lr=1.0",
                          "train.max_steps=3", "train.eval_steps=1", "train.warmup_steps=0"), log=quiet)  # fmt: skip
    result = _result(run)
    assert result["final_step"] == 0 and result["best_step"] == 0, result
    assert "untrained model" in (run / "summary.md").read_text()
    from safetensors.torch import load_file

    base = load_file(model_dir / "model.safetensors")
    final = final_weights(run)
    assert all(torch.equal(final[k], base[k]) for k in base if k in final)


def test_keep_best_needs_validation_data(tmp_path, model_dir, data_file, capsys):
    code = main(["train", "-q", f"model.name={model_dir}", f"data.path={data_file}", "data.val_ratio=0",
                 "train.keep=best", f"train.output_dir={tmp_path}"])  # fmt: skip
    assert code == 2 and "train.keep: 'best' needs validation data" in capsys.readouterr().err


# -- the schedule's ends -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_no_update_is_made_at_learning_rate_zero(kind):
    cfg = load_config(None, [f"train.schedule={kind}", "train.warmup_steps=3", "train.lr=1e-3"])
    schedule = Schedule(cfg.train, 10)
    lrs = [schedule.lr(step) for step in range(10)]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[2] == lrs[3] == pytest.approx(1e-3)
    assert all(a > b > 0 for a, b in zip(lrs[3:], lrs[4:], strict=False)), lrs


def test_extending_a_finished_run_recomputes_the_schedule(tmp_path, model_dir, data_file):
    run = finetune(config(tmp_path, model_dir, data_file, "train.max_steps=4", "train.warmup_steps=1"),
                   log=quiet)  # fmt: skip
    extended = finetune(
        load_config(run / "config.yaml", ["train.max_steps=8"]), resume=run, log=quiet
    )
    logged = [(r["step"], r["lr"]) for r in losses(extended)]
    assert [s for s, _ in logged] == list(range(1, 9))
    schedule = Schedule(load_config(run / "config.yaml").train, 8)
    assert all(lr > 0 for _, lr in logged)
    assert [lr for _, lr in logged[4:]] == pytest.approx([schedule.lr(s) for s in range(4, 8)])


@pytest.mark.parametrize("policy, said", [("drop", "2 dropped"), ("truncate", "2 truncated")])
def test_the_truncation_policy_is_reported(tmp_path, model_dir, policy, said, capsys):
    rows = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(8)]
    rows += [{"instruction": "Repeat the word", "output": "word " * 200} for _ in range(2)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    settings = [f"model.name={model_dir}", f"data.path={data}", f"train.output_dir={tmp_path}", "name=t",
                "data.val_ratio=0", "data.max_seq_len=64", f"data.truncation={policy}",
                "train.micro_batch_size=2", "train.max_steps=1"]  # fmt: skip
    assert main(["train", "--dry-run", *settings]) == 0
    out = capsys.readouterr().out
    assert said in out and ("max_seq_len 64" in out or "to 64 tokens" in out), out
    lines = []
    run = finetune(load_config(None, settings), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any(said in line for line in lines), lines
    assert said in (run / "summary.md").read_text()
    assert json.loads((run / "result.json").read_text())["truncated"] == (
        2 if policy == "truncate" else 0
    )


def test_an_empty_data_path_is_missing(tmp_path, capsys):
    assert main(["train", "-q", "data.path=", f"train.output_dir={tmp_path}"]) == 2
    assert "data.path: missing (the training data file)" in capsys.readouterr().err
