"""DPO on the real default model: two LoRA steps on the example's pairs, the first at the
reference (loss ln 2 exactly: the adapter starts at zero), then preference accuracy of the run
through `tunelab eval`."""

import json
import math
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.models import catalog

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_two_dpo_steps_and_preference_accuracy_on_smollm2(tmp_path, capsys):
    catalog.pull("smollm2-135m-instruct")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join((ROOT / "examples/prefer/train.jsonl").read_text().splitlines(True)[:8])
    )
    code = main(["train", "-q", str(ROOT / "examples/prefer/dpo.yaml"), "model.name=smollm2-135m-instruct",
                 f"data.path={pairs}", "data.val_path=null", "data.val_ratio=0", "train.max_steps=2",
                 "train.micro_batch_size=2", "train.grad_accum=1", "train.lr=1e-4",
                 f"train.output_dir={tmp_path}", "name=dpo"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "dpo"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-6) and "reward_accuracy" in steps[1]
    code = main(["eval", str(run), "--data", str(pairs), "--out", str(tmp_path / "ev"), "-q"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "ev" / "dpo" / "metrics.json").read_text())
    assert meta["kind"] == "preference" and meta["examples"] == 8
    assert 0.0 <= meta["metrics"]["preference_accuracy"] <= 1.0
