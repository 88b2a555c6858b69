"""Replay (data.replay: FILE | self) in training: exact resume, self-rehearsal generated once and
cached, the replay examples in every step, bad replay input refused before any weights load."""

import json

import pytest
import torch

from tests.integration.runs import (
    Interrupted,
    config,
    final_weights,
    halt_after,
    losses,
    quiet,
    record_steps,
)
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.evaluate import run as evaluate_run
from tunelab.train.replay import REHEARSAL_FILE
from tunelab.workflow.finetune import finetune


@pytest.fixture
def answers(monkeypatch):
    """The base model's answers, as a tiny random model cannot give them: each reply names its
    prompt. Returns the prompts generated, call by call."""
    calls = []

    def echo(model, tokenizer, conversations, options=None, on_progress=None):
        calls.append([c[-1]["content"] for c in conversations])
        return [f"About {c[-1]['content'][:30]}: yes." for c in conversations]

    monkeypatch.setattr(evaluate_run, "generate", echo)
    return calls


@pytest.mark.parametrize("kind", ["file", "self"])
def test_a_run_with_replay_resumes_exactly(
    tmp_path, model_dir, data_file, general_file, answers, kind
):
    replay = str(general_file) if kind == "file" else "self"
    extra = (f"data.replay={replay}", "data.replay_ratio=0.5", "train.max_steps=7",
             "train.warmup_steps=2")  # fmt: skip
    whole = finetune(config(tmp_path / "whole", model_dir, data_file, *extra), log=quiet)
    cfg = config(tmp_path / "cut", model_dir, data_file, *extra)
    with pytest.raises(Interrupted):
        finetune(cfg, log=quiet, progress=halt_after(3))
    cut = tmp_path / "cut" / "run"
    generated = len(answers)
    resumed = finetune(load_config(cut / "config.yaml"), resume=cut, log=quiet)
    a, b = losses(whole), losses(resumed)
    assert [(r["step"], r["loss"], r["order"]) for r in a] == [
        (r["step"], r["loss"], r["order"]) for r in b
    ]
    wa, wb = final_weights(whole), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    result = json.loads((resumed / "result.json").read_text())
    assert "2 of 4 sequences a step" in result["replay"]
    if kind == "self":  # generated once per run folder: the whole run's and the cut run's
        assert generated == 2 and len(answers) == 2, "the resumed run generated again"
        assert (cut / REHEARSAL_FILE).read_bytes() == (whole / REHEARSAL_FILE).read_bytes()
        rows = [json.loads(x) for x in (cut / REHEARSAL_FILE).read_text().splitlines()]
        assert len(rows) == 14 == len(answers[0])  # 7 steps x 2: no more than the run needs
        assert [r["messages"][0]["content"] for r in rows] == answers[0]


def test_every_step_trains_on_its_share_of_the_replay_pool(tmp_path, model_dir, data_file, general_file,
                                                           monkeypatch):  # fmt: skip
    """The replay examples really reach the steps: 2 of every 4 sequences, from the pool."""
    steps = record_steps(monkeypatch)
    run = finetune(config(tmp_path, model_dir, data_file, f"data.replay={general_file}",
                          "data.replay_ratio=0.5", "train.max_steps=4"), log=quiet)  # fmt: skip
    result = json.loads((run / "result.json").read_text())
    n = result["train_examples"]
    assert n == 12 and len(steps) == 4
    for step in steps:
        assert len(step) == 4 and sorted(i >= n for i in step) == [False, False, True, True]
    first = [
        i for step in steps[:2] for i in step if i >= n
    ]  # the pool is used up before any repeats
    assert len(set(first)) == 4 and set(first) < set(range(n, n + 8))
    assert result["replay"] == f"{general_file}: 8 examples; 2 of 4 sequences a step"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (["data.replay_ratio=1.0"], ["data.replay_ratio"]),
        (
            ["data.replay_ratio=0.1"],
            ["data.replay_ratio: 0.1 of the 2 sequences", "rounds to none"],
        ),
        (["data.replay=missing.jsonl"], ["missing.jsonl: data.replay: file not found"]),
        (["train.objective=dpo"], ["data.replay works with train.objective=sft"]),
    ],
)
def test_bad_replay_settings_are_refused_before_weights_load(tmp_path, model_dir, data_file, capsys,
                                                             monkeypatch, setting, expected):  # fmt: skip
    import tunelab.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    replay = [] if any(s.startswith("data.replay=") for s in setting) else ["data.replay=self"]
    code = main(["train", "-q", f"model.name={model_dir}", f"data.path={data_file}",
                 f"train.output_dir={tmp_path / 'runs'}", "train.micro_batch_size=2",
                 "train.grad_accum=1", *replay, *setting])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, err
    assert not (tmp_path / "runs").exists()


def test_a_replay_file_with_a_bad_record_is_named_by_line(tmp_path, model_dir, data_file, capsys,
                                                          monkeypatch):  # fmt: skip
    import tunelab.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    bad = tmp_path / "replay.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    bad.write_text(
        good
        + '\n{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}\n'
    )
    code = main(["train", "-q", f"model.name={model_dir}", f"data.path={data_file}",
                 f"train.output_dir={tmp_path / 'runs'}", f"data.replay={bad}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{bad}:2" in err
    assert not (tmp_path / "runs").exists()


def test_a_changed_replay_file_is_not_resumed(tmp_path, model_dir, data_file, general_file):
    from tunelab.train.plan import ResumeError

    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(general_file.read_bytes())
    run = finetune(config(tmp_path, model_dir, data_file, f"data.replay={pool}",
                          "train.max_steps=2"), log=quiet)  # fmt: skip
    pool.write_text(pool.read_text().replace("fine", "dull"))
    with pytest.raises(ResumeError, match="data.replay_file"):
        finetune(load_config(run / "config.yaml", ["train.max_steps=3"]), resume=run, log=quiet)
