"""What the speed work must not change: bf16 training keeps the loss of fp32 training (within
1 % over 100 steps), ``auto`` records what it chose and why."""

import json
import statistics

from tests.integration.runs import config, losses, quiet
from tunelab.workflow.finetune import finetune


def test_bf16_training_keeps_loss_parity_with_fp32(tmp_path, model_dir, data_file):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = config(tmp_path / precision, model_dir, data_file, f"model.precision={precision}",
                     "train.max_steps=100", "train.eval_steps=50", "train.save_steps=100")  # fmt: skip
        runs[precision] = finetune(cfg, log=quiet)
    fp32, bf16 = ([r["loss"] for r in losses(runs[p])] for p in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 100
    drift = statistics.mean(abs(a - b) / a for a, b in zip(fp32, bf16, strict=True))
    assert 0 < drift < 0.01, drift  # bf16 really ran (not bit-identical) and stayed close
    assert fp32[-1] < 0.95 * fp32[0]  # over a curve that moves
    assert json.loads((runs["bf16"] / "result.json").read_text())["precision"] == "bf16"
