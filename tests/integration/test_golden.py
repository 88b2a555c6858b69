"""Golden values: a tiny model with fixed weights and fixed data, 6 steps per method, the
per-step losses pinned to literal numbers (the torchtune way). A change that shifts both sides
of a self-comparison — the loss normalisation, the schedule, the data order, the prompt weight
— turns these red; if the change is intended, re-pin the numbers and say why in the commit."""

import pytest

from tests.integration.runs import config, losses, quiet
from tunelab.workflow.finetune import finetune

GOLDEN = {  # torch 2.13.0 CPU, fp32; step 1 is the untrained model's loss for all three
    "freeze": [6.2615488, 6.0712545, 5.9680331, 5.9124627, 5.8157048, 5.6575596],
    "full": [6.2615488, 5.9001372, 5.5405536, 5.1450112, 4.7185183, 4.5641658],
    "lora": [6.2615488, 6.2031281, 6.1439478, 6.0888443, 6.0508828, 6.0060637],
}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_per_step_losses_are_pinned(tmp_path, model_dir, data_file, method):
    cfg = config(
        tmp_path, model_dir, data_file, f"method.name={method}", "data.val_ratio=0",
        "method.trainable_layers=1", "train.warmup_steps=2", "train.save_steps=6", "train.lr=5e-3",
    )  # fmt: skip
    got = [r["loss"] for r in losses(finetune(cfg, log=quiet))]
    assert got == pytest.approx(GOLDEN[method], rel=2e-5), got
