"""Atomic checkpoints (RELIABILITY 14) and the state an exact resume needs (13, 16)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from tunelab.checkpoint.manager import CheckpointManager
from tunelab.checkpoint.state import (
    CheckpointError,
    capture_rng,
    fingerprint_diff,
    load_state,
    restore_rng,
    save_state,
)

# ---- manager -----------------------------------------------------------------------------


def writer(text: str):
    def write(folder):
        (folder / "weights.txt").write_text(text)

    return write


def names(paths):
    return [p.name for p in paths]


def test_save_makes_a_step_folder_and_points_latest_at_it(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    assert ckpt.latest() is None and ckpt.list() == []

    path = ckpt.save(12, writer("a"))

    assert path == tmp_path / "checkpoints" / "step-000012"
    assert (path / "weights.txt").read_text() == "a"
    assert ckpt.latest() == path
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"
    assert ckpt.best() is None and ckpt.best_metric() is None
    assert CheckpointManager.step_of(path) == 12


def test_best_follows_the_metric_in_either_direction(tmp_path):
    lower = CheckpointManager(tmp_path / "a", keep_last=5)
    for step, metric in [(1, 2.0), (2, 1.5), (3, 1.7), (4, float("nan"))]:
        lower.save(step, writer(str(step)), metric=metric)
    assert lower.best().name == "step-000002"
    assert lower.best_metric() == 1.5
    assert json.loads((lower.dir / "best.json").read_text()) == {"step": 2, "metric": 1.5}
    assert (lower.dir / "best").read_text().strip() == "step-000002"
    assert lower.latest().name == "step-000004"

    higher = CheckpointManager(tmp_path / "b", keep_last=5)
    for step, metric in [(1, 0.2), (2, 0.5), (3, 0.4)]:
        higher.save(step, writer(str(step)), metric=metric, lower_is_better=False)
    assert higher.best().name == "step-000002"


def test_prune_keeps_the_last_k_plus_the_best(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step, metric in [(10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5), (50, 2.2)]:
        ckpt.save(step, writer(str(step)), metric=metric)

    assert names(ckpt.list()) == ["step-000020", "step-000040", "step-000050"]
    assert ckpt.best().name == "step-000020"
    assert ckpt.latest().name == "step-000050"
    assert not [p for p in ckpt.dir.iterdir() if p.name.startswith(".")]


def test_prune_never_deletes_the_latest_even_when_older_than_the_rest(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=1)
    ckpt.save(30, writer("30"))
    ckpt.save(10, writer("10"))  # e.g. a run restarted from an earlier checkpoint
    assert names(ckpt.list()) == ["step-000010", "step-000030"]
    assert ckpt.latest().name == "step-000010"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, error):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = CheckpointManager(tmp_path)

    def good(folder):
        save_state(folder, optimizer=optimizer, scheduler=scheduler, trainer_state={"step": 1})

    def bad(folder):
        (folder / "optimizer.pt").write_bytes(b"half")
        raise error

    first = ckpt.save(1, good)
    with pytest.raises(type(error)):
        ckpt.save(2, bad)

    assert ckpt.latest() == first
    assert (ckpt.dir / "latest").read_text().strip() == "step-000001"
    assert ckpt.list() == [first]
    assert [p.name for p in ckpt.dir.iterdir() if p.name.startswith(".")] == []
    state = load_state(ckpt.latest(), optimizer=optimizer, scheduler=scheduler)
    assert state == {"step": 1}


def test_a_stale_temp_folder_is_ignored_and_cleaned_on_the_next_save(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    first = ckpt.save(1, writer("1"))
    stale = ckpt.dir / ".tmp-step-000002-killed"  # a process killed while writing step 2
    stale.mkdir()
    (stale / "weights.txt").write_text("partial")
    (ckpt.dir / ".tmp-latest-killed").write_text("step-000002")

    assert ckpt.latest() == first
    assert ckpt.list() == [first]

    (ckpt.dir / "latest").unlink()  # even without the pointer, never a temp folder
    assert ckpt.latest() == first

    ckpt.save(3, writer("3"))
    assert not stale.exists()
    assert not (ckpt.dir / ".tmp-latest-killed").exists()


def test_latest_falls_back_to_the_newest_complete_folder(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ckpt.save(step, writer(str(step)))
    shutil.rmtree(ckpt.dir / "step-000003")  # deleted by hand
    assert ckpt.latest().name == "step-000002"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(5, writer("first"))
    ckpt.save(5, writer("second"))
    assert names(ckpt.list()) == ["step-000005"]
    assert (ckpt.latest() / "weights.txt").read_text() == "second"
    assert not [p for p in ckpt.dir.iterdir() if p.name.startswith(".")]


def test_a_failed_rename_when_resaving_puts_the_old_folder_back(tmp_path, monkeypatch):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(5, writer("first"))
    real_rename = os.rename

    def rename(src, dst):
        if str(src).split(os.sep)[-1].startswith(".tmp-step"):
            raise OSError("simulated")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(5, writer("second"))
    monkeypatch.undo()

    assert (ckpt.latest() / "weights.txt").read_text() == "first"


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


# ---- state -------------------------------------------------------------------------------


def draw():
    cuda = [torch.rand(3, device="cuda").tolist()] if torch.cuda.is_available() else []
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),  # exercises numpy's cached gaussian
        torch.rand(3).tolist(),
        *cuda,
    )


def test_rng_round_trip_reproduces_the_same_numbers():
    np.random.randn(1)  # leave a cached gaussian in numpy's state
    state = capture_rng()
    expected = draw()
    draw()
    restore_rng(state)
    assert draw() == expected


def test_rng_round_trip_through_the_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_state(tmp_path, optimizer=optimizer, scheduler=None, trainer_state={})
    expected = draw()
    draw()
    load_state(tmp_path, optimizer=optimizer, scheduler=None)
    assert draw() == expected


def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    x = torch.randn(5, 4)  # draws from the RNG, so the RNG state matters too
    loss = (model(x) ** 2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_resume_gives_bit_identical_parameters(tmp_path):
    model, optimizer, scheduler = make_run()
    torch.manual_seed(123)
    for _ in range(6):
        train_step(model, optimizer, scheduler)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_lr = scheduler.get_last_lr()

    model, optimizer, scheduler = make_run()
    torch.manual_seed(123)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_state(
        tmp_path, optimizer=optimizer, scheduler=scheduler, trainer_state={"step": 3, "epoch": 0}
    )

    torch.manual_seed(999)  # a new process: other RNG state, fresh objects
    model, optimizer, scheduler = make_run(seed=7)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    state = load_state(tmp_path, optimizer=optimizer, scheduler=scheduler)
    assert state == {"step": 3, "epoch": 0}
    for _ in range(3):
        train_step(model, optimizer, scheduler)

    assert scheduler.get_last_lr() == expected_lr
    for got, want in zip(model.parameters(), expected, strict=True):
        assert torch.equal(got, want)


def test_scaler_state_round_trips(tmp_path):
    model, optimizer, scheduler = make_run()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    save_state(tmp_path, optimizer=optimizer, scheduler=scheduler, trainer_state={}, scaler=scaler)
    other = torch.amp.GradScaler("cpu", init_scale=8.0)
    load_state(tmp_path, optimizer=optimizer, scheduler=scheduler, scaler=other)
    assert other.state_dict()["scale"] == 1024.0


@pytest.mark.parametrize(
    "name, content",
    [
        ("optimizer.pt", b"not a torch file"),
        ("scheduler.pt", None),  # missing
        ("rng.pt", "truncate"),
        ("trainer_state.json", b'{"step": 3,'),
    ],
)
def test_a_missing_or_corrupt_file_is_named(tmp_path, name, content):
    model, optimizer, scheduler = make_run()
    save_state(tmp_path, optimizer=optimizer, scheduler=scheduler, trainer_state={"step": 3})
    path = tmp_path / name
    if content is None:
        path.unlink()
    elif content == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    lr_before = optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 123.0

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_state(tmp_path, optimizer=optimizer, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == 123.0  # nothing applied
    assert lr_before != 123.0


def test_an_optimizer_state_that_does_not_fit_is_an_error(tmp_path):
    _, optimizer, scheduler = make_run()
    save_state(tmp_path, optimizer=optimizer, scheduler=scheduler, trainer_state={})
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # 1 parameter, not 2
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: does not fit"):
        load_state(tmp_path, optimizer=other, scheduler=None)


def test_fingerprint_diff_lists_each_changed_field():
    saved = {"model": "abc123", "data": "d1", "method": {"name": "lora", "r": 16},
             "train.lr": 2e-4, "train.betas": [0.9, 0.999], "old": 1}  # fmt: skip
    current = {"model": "def456", "data": "d1", "method": {"name": "lora", "r": 8},
               "train.lr": 0.0002, "train.betas": (0.9, 0.999), "new": True}  # fmt: skip

    assert fingerprint_diff(saved, current) == [
        "model: checkpoint was trained with abc123, the config now gives def456",
        "method.r: checkpoint was trained with 16, the config now gives 8",
        "old: checkpoint was trained with 1, the config now gives none",
        "new: checkpoint has no value, the config now gives true",
    ]
    assert fingerprint_diff(saved, json.loads(json.dumps(saved))) == []
