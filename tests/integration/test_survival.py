"""Runs survive (RELIABILITY 10, 13-20): out of memory anywhere, damaged checkpoints, a run
that died before its first checkpoint, frozen weights in memory, and crashes at random points."""

import json
import random

import pytest
import torch

from tests.integration.runs import Interrupted, config, final_weights, halt_after, losses, quiet
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.train.plan import build_plan
from tunelab.train.recipe import prepare, train
from tunelab.workflow.finetune import finetune

OOM = "CUDA out of memory. Tried to allocate 20.00 GiB"


def _args(tmp_path, model_dir, data_file, *extra):
    return ["train", "-q", f"model.name={model_dir}", f"data.path={data_file}", f"train.output_dir={tmp_path}",
            "name=run", "train.micro_batch_size=2", "train.max_steps=4", "train.save_steps=1", *extra]  # fmt: skip


# -- 18: out of memory at load, in the backward pass, at the optimizer update -----------------
class _OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.cuda.OutOfMemoryError(OOM)


def _inject(monkeypatch, where, at_step):
    import tunelab.train.recipe as recipe
    from tunelab.train.objectives import sft

    calls = {"n": 0}
    if where == "model load":

        def load_weights(*a, **k):
            raise torch.cuda.OutOfMemoryError(OOM)

        monkeypatch.setattr(recipe, "load_weights", load_weights)
    elif where == "backward":
        real = sft.SFT.loss_sum

        def loss_sum(self, model, batch):
            out = real(self, model, batch)
            calls["n"] += 1
            return _OOMInBackward.apply(out) if model.training and calls["n"] == at_step else out

        monkeypatch.setattr(sft.SFT, "loss_sum", loss_sum)
    else:  # the optimizer update (AdamW allocates its state at the first one)
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == at_step:
                raise torch.cuda.OutOfMemoryError(OOM)
            return real_step(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize(
    "where, at_step, message, latest",
    [
        ("model load", 0, "out of memory during model load", None),
        ("backward", 3, "out of memory during step 3", "step-000002"),
        ("optimizer", 1, "out of memory during the optimizer update of step 1", None),
        ("optimizer", 3, "out of memory during the optimizer update of step 3", "step-000002"),
    ],
)
def test_out_of_memory_anywhere_gives_advice(tmp_path, model_dir, data_file, monkeypatch, capsys,
                                              where, at_step, message, latest):  # fmt: skip
    _inject(monkeypatch, where, at_step)
    code = main(_args(tmp_path, model_dir, data_file, "data.val_ratio=0"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "Try:" in err and "checkpoint is intact" in err
    if where == "model load":
        assert "micro-batch" not in err and "smaller model" in err  # only what shrinks weights
    else:
        assert "micro_batch_size=1" in err
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    if latest is None:
        assert not pointer.exists()
    else:
        assert pointer.read_text().strip() == latest
        monkeypatch.undo()
        assert main(["train", "-q", "--resume", str(tmp_path / "run")]) == 0  # and it resumes


# -- 20: damaged checkpoints -------------------------------------------------------------------
DAMAGE = {
    "trainer_state.json corrupt": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "trainer_state.json missing": lambda c: (c / "trainer_state.json").unlink(),
    "adapter truncated": lambda c: _truncate(c / "trained" / "adapter_model.safetensors"),
    "adapter flipped byte": lambda c: _flip(c / "trained" / "adapter_model.safetensors"),
    "optimizer missing": lambda c: (c / "optimizer.pt").unlink(),
    "manifest missing": lambda c: (c / "manifest.json").unlink(),
}


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, model_dir, data_file):
    """(a run stopped after step 3 of 5 with checkpoints 1-3, the uninterrupted run's weights)."""
    root = tmp_path_factory.mktemp("stopped")
    whole = finetune(config(root / "whole", model_dir, data_file, "train.max_steps=5"), log=quiet)
    with pytest.raises(Interrupted):
        finetune(
            config(root, model_dir, data_file, "train.max_steps=5"),
            log=quiet,
            progress=halt_after(3),
        )
    return root / "run", final_weights(whole)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_skipped(tmp_path, stopped_run, capsys, damage):
    import shutil

    run = shutil.copytree(stopped_run[0], tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / "step-000003")
    assert main(["train", "-q", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "step-000003 is damaged" in err and "resuming from step-000002" in err, err
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from"] == 2
    expected, got = stopped_run[1], final_weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(
    tmp_path, model_dir, data_file, capsys
):
    with pytest.raises(Interrupted):
        finetune(config(tmp_path, model_dir, data_file), log=quiet, progress=halt_after(2))
    run = tmp_path / "run"
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / "trainer_state.json").write_text("{not json")
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "-q", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert (
        "no intact checkpoint" in err and "step-000002 is damaged" in err and "Traceback" not in err
    )
    assert (run / "metrics.jsonl").read_text() == before and not (run / "final").exists()


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(
    tmp_path, model_dir, data_file, capsys
):
    settings = ("train.save_steps=10", "train.max_steps=3", "data.val_ratio=0")
    args = _args(tmp_path, model_dir, data_file, *settings)
    whole = finetune(
        load_config(None, [*args[2:], f"train.output_dir={tmp_path / 'whole'}"]), log=quiet
    )
    with pytest.raises(Interrupted):
        finetune(load_config(None, args[2:]), log=quiet, progress=halt_after(1))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and not list(run.glob("checkpoints/step-*"))
    assert main(args) == 2  # a rerun is refused and says what to do
    assert f"--resume {run}" in capsys.readouterr().err
    assert main(["train", "-q", "--resume", str(run)]) == 0
    assert "starting it from step 0" in capsys.readouterr().err
    assert [r["step"] for r in losses(run)] == [1, 2, 3]
    wa, wb = final_weights(whole), final_weights(run)
    assert wa and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- 10: frozen is frozen, in memory -----------------------------------------------------------
def _run_in_memory(tmp_path, model_dir, data_file, *extra, before_step=None):
    plan = build_plan(
        config(tmp_path, model_dir, data_file, "train.weight_decay=0.1", "train.lr=1e-2", *extra)
    )
    run = prepare(plan, log=quiet)
    return run


@pytest.mark.parametrize("method", ["lora", "qlora-logic"])
def test_lora_leaves_the_base_bit_identical_in_memory(
    tmp_path, model_dir, data_file, monkeypatch, method
):
    if method == "qlora-logic":  # QLoRA's own preparation of a (pretend) quantised base, on CPU
        from tunelab.models.methods import lora

        monkeypatch.setattr(lora, "is_quantized", lambda model: True)
        monkeypatch.setattr(lora.QLoRA, "check", lambda self, placement: None)
        monkeypatch.setattr(lora.QLoRA, "quantize_bits", None)
    name = "qlora" if method == "qlora-logic" else "lora"
    plan = build_plan(config(tmp_path, model_dir, data_file, f"method.name={name}", "train.weight_decay=0.1",
                             "train.lr=1e-2"))  # fmt: skip
    run = prepare(plan, log=quiet)
    base = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_" in n}
    train(run, log=quiet)
    after = dict(run.model.named_parameters())
    assert base and all(torch.equal(after[n], p) for n, p in base.items())
    assert any(not torch.equal(after[n], p) for n, p in adapters.items())


def test_freeze_does_not_decay_frozen_weights_that_hold_a_zero_gradient(
    tmp_path, model_dir, data_file, monkeypatch
):
    import tunelab.train.loop as loop

    real = loop.accumulate

    def with_zero_grads(model, *a, **k):  # as a hook or a distributed wrapper may leave them
        out = real(model, *a, **k)
        for p in model.parameters():
            if not p.requires_grad:
                p.grad = torch.zeros_like(p)
        return out

    monkeypatch.setattr(loop, "accumulate", with_zero_grads)
    plan = build_plan(config(tmp_path, model_dir, data_file, "method.name=freeze", "method.trainable_layers=1",
                             "method.unfreeze_every=100", "train.weight_decay=0.5", "train.lr=1e-2"))  # fmt: skip
    run = prepare(plan, log=quiet)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    train(run, log=quiet)
    after = dict(run.model.named_parameters())
    assert frozen and all(torch.equal(after[n], p) for n, p in frozen.items())


# -- 13-15, 19: crashes at random points -------------------------------------------------------
class Crash(BaseException):
    """A crash: not an Exception, so nothing in tunelab catches it."""


FAULT_POINTS = [  # (module, attribute): every call is a point where the process may die
    ("tunelab.train.loop", "accumulate"),  # in a step, before its update
    ("tunelab.train.loop", "save_state"),  # while a checkpoint is being written
    ("tunelab.checkpoint.manager", "write_manifest"),  # at the end of a checkpoint write
    ("tunelab.train.loop", "validation_loss"),  # during evaluation
    ("tunelab.train.report.MetricsLog", "append"),  # between a step and its log line
]


def _arm(monkeypatch, crash_at):
    import importlib

    counter = {"n": 0}
    for module, attr in FAULT_POINTS:
        path, _, cls = module.rpartition(".") if module.endswith("MetricsLog") else (module, "", "")
        owner = (
            getattr(importlib.import_module(path), cls) if cls else importlib.import_module(module)
        )
        real = getattr(owner, attr)

        def wrapped(*a, _real=real, **k):
            counter["n"] += 1
            if counter["n"] == crash_at:
                raise Crash(counter["n"])
            return _real(*a, **k)

        monkeypatch.setattr(owner, attr, wrapped)
    return counter


def test_crashes_at_random_points_always_resume_to_the_same_weights(
    tmp_path, model_dir, data_file, monkeypatch
):
    settings = (
        "train.max_steps=6",
        "train.save_steps=2",
        "train.eval_steps=3",
        "method.dropout=0.2",
    )
    with monkeypatch.context() as m:
        counter = _arm(m, crash_at=0)
        whole = finetune(config(tmp_path / "whole", model_dir, data_file, *settings), log=quiet)
        points = counter["n"]
    expected = final_weights(whole)
    targets = sorted(random.Random(7).sample(range(1, points + 1), min(20, points)))
    assert len(targets) == 20, points
    for target in targets:
        out = tmp_path / f"crash-{target}"
        with monkeypatch.context() as m:
            _arm(m, crash_at=target)
            with pytest.raises(Crash):
                finetune(config(out, model_dir, data_file, *settings), log=quiet)
        run = out / "run"
        resumed = finetune(load_config(run / "config.yaml"), resume=run, log=quiet)
        got = final_weights(resumed)
        assert got.keys() == expected.keys(), target
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"crash at point {target}"
        assert [r["step"] for r in losses(resumed)] == list(range(1, 7)), target
