"""Helpers shared by the training tests: a small config, the logged losses, the final weights,
and a progress callback that stops a run like a crash would."""

import json

from safetensors.torch import load_file

from tunelab.config.load import load_config


def config(tmp_path, model_dir, data_file, *extra):
    base = [
        f"model.name={model_dir}", f"data.path={data_file}", "data.val_ratio=0.25",
        f"train.output_dir={tmp_path}", "name=run", "train.micro_batch_size=2", "train.grad_accum=2",
        "train.max_steps=6", "train.lr=1e-3", "train.eval_steps=2", "train.save_steps=1", "train.keep_last=10",
        "method.r=4",
    ]  # fmt: skip
    return load_config(None, base + list(extra))


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r for r in records(run_dir) if "loss" in r]


def quiet(*_a, **_k):
    pass


def final_weights(run, folder="final"):
    out = {}
    for f in (run / folder).glob("*.safetensors"):
        out.update(load_file(f))
    return out


class Interrupted(Exception):
    """Raised from the progress callback: the process stops as a crash would."""


def halt_after(step, seen=None):
    """A progress callback that stops the run once step ``step + 1`` has been computed, so
    the last checkpoint is step ``step``'s (with save_steps=1). ``seen`` collects the steps."""

    def progress(_at, _total, record):
        if seen is not None and "loss" in record:
            seen.append(record["step"])
        if "loss" in record and record["step"] == step + 1:
            raise Interrupted(step)

    return progress


def record_steps(monkeypatch) -> list[list[int]]:
    """Every optimizer step's example indices, as the loop asks for their batches (filled as a
    run goes)."""
    import tunelab.train.loop as loop

    steps = []
    real = loop.Run.batches

    def spy(self, indices, to_device=True):
        steps.append([i for mb in indices for i in mb])
        return real(self, indices, to_device)

    monkeypatch.setattr(loop.Run, "batches", spy)
    return steps
