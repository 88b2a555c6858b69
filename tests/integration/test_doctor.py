"""tunelab doctor on real tiny-model runs, and its command: bad input exits 2, writes nothing."""

import json
import random

import pytest

from tests.integration.runs import config, quiet
from tunelab.cli import main
from tunelab.workflow.finetune import finetune

SHORT = ["train.save_steps=100", "train.grad_accum=1"]


def doctor_json(capsys, run_dir):
    assert main(["doctor", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def random_pairs(tmp_path_factory):
    """8 conversations of random letters: nothing to generalise, only to memorise."""
    rnd = random.Random(0)
    rows = [{"messages": [
        {"role": "user", "content": "".join(rnd.choice("abcdefghij") for _ in range(12))},
        {"role": "assistant", "content": "".join(rnd.choice("klmnopqrst") for _ in range(12))},
    ]} for _ in range(8)]  # fmt: skip
    path = tmp_path_factory.mktemp("random") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_lr_far_too_high_is_lr_too_high(tmp_path, model_dir, data_file, capsys):
    extra = ["method.name=full", "train.lr=1.0", "train.max_steps=30", "train.eval_steps=10"]
    run_dir = finetune(config(tmp_path, model_dir, data_file, *extra, *SHORT), log=quiet)
    assert "## lr_too_high" in (run_dir / "doctor.md").read_text()  # written by finish()
    assert (run_dir / "doctor.png").stat().st_size > 0
    found = doctor_json(capsys, run_dir)
    assert found[0]["kind"] == "lr_too_high"
    assert found[0]["advice"] == "lower train.lr by 3-10x (now 1)"


def test_lr_far_too_low_is_lr_too_low(tmp_path, model_dir, data_file, capsys):
    # lr=1e-7 with LoRA (B starts at zero) moves nothing in 30 steps: the loss is flat from the
    # start, so it is lr_too_low (the "hardly moved" case), not not_converged (nothing falls).
    extra = ["train.lr=1e-7", "train.max_steps=30", "train.eval_steps=10"]
    run_dir = finetune(config(tmp_path, model_dir, data_file, *extra, *SHORT), log=quiet)
    assert [f["kind"] for f in doctor_json(capsys, run_dir)] == ["lr_too_low"]


def test_many_epochs_on_few_examples_is_overfitting(tmp_path, model_dir, random_pairs, capsys):
    # 4 train pairs of random letters, 40 steps (20 epochs): the tiny model cannot reach
    # perplexity ~1 that fast, but its validation loss turns up early while training falls.
    extra = ["method.name=full", "train.lr=1e-2", "train.max_steps=40", "train.eval_steps=4",
             "data.val_ratio=0.5"]  # fmt: skip
    run_dir = finetune(config(tmp_path, model_dir, random_pairs, *extra, *SHORT), log=quiet)
    found = {f["kind"]: f for f in doctor_json(capsys, run_dir)}
    assert "overfitting" in found or "memorisation" in found
    if "overfitting" in found:
        assert found["overfitting"]["advice"].startswith("the best step is ")


def test_doctor_command_prints_and_writes(tmp_path, model_dir, data_file, capsys):
    run_dir = finetune(config(tmp_path, model_dir, data_file, "train.max_steps=10"), log=quiet)
    (run_dir / "doctor.md").unlink()
    assert main(["doctor", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "evidence:" in out and "advice:" in out
    assert (run_dir / "doctor.md").read_text().startswith(f"# Doctor: {run_dir.name}")


def tree(folder):
    return sorted(p.name for p in folder.rglob("*"))


def test_missing_folder_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["doctor", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such run folder" in err.replace("\n", "") and "Traceback" not in err
    assert not missing.exists()


@pytest.mark.parametrize("metrics", [None, "", '{"step": 0, "eval_loss": 6.2}\n'])
def test_folder_without_training_records_exits_2(tmp_path, capsys, metrics):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text(metrics)
    before = tree(run_dir)
    assert main(["doctor", str(run_dir), "--json"]) == 2
    captured = capsys.readouterr()
    assert str(run_dir) in captured.err.replace("\n", "") and captured.out == ""
    assert tree(run_dir) == before


@pytest.mark.parametrize("setting", ["warn", "stop", "off"])
def test_train_doctor_watches_the_curve_during_training(tmp_path, model_dir, data_file, setting):
    from tunelab.train.guards import TrainingStopped

    extra = ["method.name=full", "train.lr=1.0", "train.max_steps=30", "train.eval_steps=5",
             f"train.doctor={setting}"]  # fmt: skip
    lines = []
    cfg = config(tmp_path, model_dir, data_file, *extra, *SHORT)
    if setting == "stop":
        with pytest.raises(
            TrainingStopped, match="doctor at step .*: lr_too_high: .*train.doctor=stop"
        ):
            finetune(cfg, log=lines.append)
        return
    finetune(cfg, log=lines.append)
    said = [line for line in lines if line.startswith("doctor at step")]
    if setting == "off":
        assert not said
    else:  # said once, mid-run, with the advice
        assert len([s for s in said if "lr_too_high" in s]) == 1 and "lower train.lr" in said[0]
        assert not said[0].startswith("doctor at step 30")


def test_a_failing_diagnosis_does_not_fail_a_finished_run(
    tmp_path, model_dir, data_file, monkeypatch
):
    from tunelab.train import recipe

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(recipe, "write_doctor", broken)
    lines = []
    run_dir = finetune(
        config(tmp_path, model_dir, data_file, "train.max_steps=2", *SHORT), log=lines.append
    )
    assert (run_dir / "result.json").is_file() and (run_dir / "final").is_dir()
    assert any(
        "doctor: could not diagnose this run (ZeroDivisionError: boom)" in line for line in lines
    )
