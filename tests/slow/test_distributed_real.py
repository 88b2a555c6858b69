"""The README's command for several processes on the real default model: `tunelab train
examples/extract/train.yaml --nproc 2` trains, on this CPU with gloo, the steps one process
trains."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_model_on_two_processes(tmp_path):
    def run(nproc):
        args = [f"train.output_dir={tmp_path}", f"name=p{nproc}", "train.max_steps=3",
                "train.eval_steps=100", "train.eval_at_start=false", "eval.at_end=false",
                "train.warmup_steps=0"]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "tunelab", "train", str(ROOT / "examples/extract/train.yaml"),
             "--nproc", str(nproc), "-q", *args],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = (tmp_path / f"p{nproc}" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in metrics if '"loss"' in x]

    two, one = run(2), run(1)
    assert len(two) == 3
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # the same first micro-batches and weights
    # then bf16 gradients summed in another order, which Adam's first sign-like updates
    # amplify (measured: 0.4 %); exactness is the tiny fp32 model's test (integration/)
    assert two == pytest.approx(one, rel=1e-2)
    result = json.loads((tmp_path / "p2" / "result.json").read_text())
    assert result["world_size"] == 2 and result["distributed"] == "ddp"
