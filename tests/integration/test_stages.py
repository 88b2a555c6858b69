"""A run in stages: one after another in one run folder, each at its own learning rate, the later
replaying the earlier's data; exact resume across a stage boundary; bad stage lists refused."""

import json

import pytest
import torch

from tests.integration.runs import (
    Interrupted,
    final_weights,
    halt_after,
    losses,
    quiet,
    record_steps,
    records,
)
from tunelab.cli import main
from tunelab.config.load import dump_config, load_config
from tunelab.workflow.finetune import finetune


def staged(tmp_path, model_dir, data_file, general_file, *extra):
    """Stage 1: 3 steps on general_file data at lr 1e-3; stage 2: 4 steps on the task at 5e-4,
    replaying stage 1 at 0.5 (2 of 4 sequences a step)."""
    folder = tmp_path / "cfg"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    cfg = load_config(None, [f"model.name={model_dir}", f"train.output_dir={tmp_path}", "name=run",
                             "data.val_ratio=0.25", "train.micro_batch_size=2", "train.grad_accum=2",
                             "train.warmup_steps=1", "train.eval_steps=2", "train.save_steps=1",
                             "train.keep_last=10", "method.r=4", *extra])  # fmt: skip
    text = dump_config(cfg) + (
        f"stages:\n  - name: general_file\n    data: {general_file}\n    max_steps: 3\n    lr: 1.0e-3\n"
        f"  - name: task\n    data: {data_file}\n    max_steps: 4\n    lr: 5.0e-4\n"
        f"    replay: [general_file]\n    replay_ratio: 0.5\n"
    )
    path.write_text(text)
    return load_config(path, [])


def test_stages_run_one_after_another_each_at_its_own_rate(tmp_path, model_dir, data_file, general_file,
                                                           monkeypatch):  # fmt: skip
    seen = record_steps(monkeypatch)
    run = finetune(staged(tmp_path, model_dir, data_file, general_file), log=quiet)
    steps = losses(run)
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert [r["stage"] for r in steps] == ["general_file"] * 3 + ["task"] * 4
    assert steps[0]["lr"] == pytest.approx(1e-3) and steps[3]["lr"] == pytest.approx(5e-4)
    assert max(r["lr"] for r in steps[3:]) == pytest.approx(5e-4)  # its own warmup and peak
    n = json.loads((run / "result.json").read_text())["train_examples"]
    assert n == 12 + 8  # the task's training share, then stage 1's examples
    for step in seen[:3]:  # stage 1: its own examples only
        assert all(i >= 12 for i in step)
    for step in seen[3:]:  # stage 2: 2 task examples and 2 replayed from stage 1, every step
        assert sorted(i >= 12 for i in step) == [False, False, True, True]
    assert (run / "train_loss.png").stat().st_size > 0
    assert all(r.get("stage") for r in records(run) if "loss" in r)


@pytest.mark.parametrize("halt", [3, 4])  # the boundary's checkpoint, and one inside stage 2
def test_a_run_in_stages_resumes_exactly_across_the_boundary(
    tmp_path, model_dir, data_file, general_file, halt
):
    whole = finetune(staged(tmp_path / "whole", model_dir, data_file, general_file), log=quiet)
    cut_cfg = staged(tmp_path / "cut", model_dir, data_file, general_file)
    with pytest.raises(Interrupted):
        finetune(cut_cfg, log=quiet, progress=halt_after(halt))
    cut = tmp_path / "cut" / "run"
    resumed = finetune(load_config(cut / "config.yaml"), resume=cut, log=quiet)
    a, b = losses(whole), losses(resumed)
    assert [(r["step"], r["loss"], r["lr"], r["order"]) for r in a] == \
        [(r["step"], r["loss"], r["lr"], r["order"]) for r in b]  # fmt: skip
    wa, wb = final_weights(whole), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            "  - name: a\n    data: {data}\n  - name: b\n    data: {data}\n    replay: [c]\n",
            "stages[1].replay: no earlier stage named 'c' (earlier stages: a)",
        ),
        (
            "  - name: a\n    data: {data}\n    replay: [b]\n  - name: b\n    data: {data}\n",
            "stages[0].replay: no earlier stage named 'b' (earlier stages: none)",
        ),
        (
            "  - name: a\n    data: {data}\n  - name: a\n    data: {data}\n",
            "stages[1].name: 'a' is used by an earlier stage",
        ),
        ("  - name: a\n    data: {data}\n  - name: b\n    data: {bad}\n", "{bad}:2"),
        ("  - name: a\n    data: missing.jsonl\n", "missing.jsonl: stages[0].data: file not found"),
    ],
)
def test_a_bad_stage_list_is_refused_before_weights_load(tmp_path, model_dir, data_file, capsys,
                                                         monkeypatch, stages, expected):  # fmt: skip
    import tunelab.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text().splitlines()[0] + '\n{"messages": [{"role": "bot"}]}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name: {model_dir}\ntrain:\n  output_dir: {tmp_path / 'runs'}\n"
                      "stages:\n" + stages.format(data=data_file, bad=bad))  # fmt: skip
    code = main(["train", str(config), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert expected.format(bad=bad) in err, err
    assert not (tmp_path / "runs").exists()
