"""CUDA paths: bf16 LoRA, fp16 with a loss scaler, QLoRA. Skipped without a GPU (conftest)."""

import importlib.util
import json

import pytest

from tunelab.config.load import load_config
from tunelab.testing import tiny_model_dir
from tunelab.workflow.finetune import finetune as run_training

pytestmark = pytest.mark.gpu


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say the word number {i}", "output": f"word {i}"} for i in range(16)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize(
    "precision, method", [("bf16", "lora"), ("fp16", "lora"), ("bf16", "full")]
)
def test_cuda_training(tmp_path, precision, method):
    model = tiny_model_dir(tmp_path / "m")
    cfg = load_config(None, [
        f"model.name={model}", f"data.path={_data(tmp_path)}", f"train.output_dir={tmp_path}", "name=r",
        f"model.precision={precision}", f"method.name={method}", "train.max_steps=4", "train.micro_batch_size=4",
        "model.device=cuda",
    ])  # fmt: skip
    run = run_training(cfg, log=lambda *a: None)
    result = json.loads((run / "result.json").read_text())
    assert result["device"] == "cuda" and result["peak_gpu_gib"] > 0
    losses = [
        json.loads(x)["loss"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert all(loss == loss for loss in losses)  # no NaN


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_loads_and_trains(tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    cfg = load_config(None, [
        f"model.name={model}", f"data.path={_data(tmp_path)}", f"train.output_dir={tmp_path}", "name=q",
        "method.name=qlora", "train.max_steps=3", "train.micro_batch_size=4",
    ])  # fmt: skip
    run = run_training(cfg, log=lambda *a: None)
    assert (run / "final" / "adapter_model.safetensors").is_file()
