"""A real LoRA fine-tune of SmolLM2-135M-Instruct on CPU: the loss falls and the run folder is
complete (and the adapter loads with PEFT's own loader)."""

import json
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.workflow.finetune import finetune as run_training

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "extract"


def test_lora_on_the_real_default_model(tmp_path):
    four = tmp_path / "four.jsonl"
    four.write_text("\n".join((EXAMPLES / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    cfg = load_config(
        EXAMPLES / "train.yaml",
        [f"data.path={four}", f"data.val_path={EXAMPLES / 'val.jsonl'}", f"train.output_dir={tmp_path}",
         "train.max_steps=4", "train.micro_batch_size=4", "train.grad_accum=1", "train.schedule=constant",
         "train.warmup_steps=0", "train.eval_steps=4", "name=real", "eval.limit=8", "eval.max_new_tokens=48"],
    )  # fmt: skip
    run = run_training(cfg, log=lambda *a: None)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    assert len(train) == 4 and train[-1] < train[0] * 0.8, train
    assert any("eval_loss" in r for r in records)
    for name in ("config.yaml", "metrics.jsonl", "train_loss.png", "summary.md", "result.json"):
        assert (run / name).is_file(), name
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    for name in ("finetuned", "general-before", "general-after"):  # eval.at_end of the example
        assert json.loads((run / "eval" / name / "metrics.json").read_text())["examples"] == 8, name

    from peft import PeftModel

    from tunelab.models.load import load_model

    base, _ = load_model("smollm2-135m-instruct")
    model = PeftModel.from_pretrained(base, run / "final")
    assert sum("lora_" in n for n, _ in model.named_parameters()) > 0
