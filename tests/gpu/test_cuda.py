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


@pytest.mark.parametrize("window", [None, 16])
def test_varlen_kernel_equals_attention_by_document(window):
    """torch's flash varlen kernel over a packed row = causal SDPA per document (forward and
    gradients, bf16 tolerance), with grouped k/v heads, within a sliding window too."""
    import torch

    from tunelab.models import varlen

    if not varlen.kernel_available("cuda", torch.bfloat16):
        pytest.skip("this torch has no varlen attention kernel")
    torch.manual_seed(0)
    lengths = [37, 5, 120, 64]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = varlen.varlen_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu,
                                     max_length_q=max(lengths), sliding_window=window)  # fmt: skip
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = varlen._by_document(q, k, v, cu.tolist(), 0.125, window)[None]
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, rtol=5e-2, atol=5e-2)


def test_cuda_packed_training_runs_by_document(tmp_path):
    """train.packing=on on a GPU in bf16: packed rows through the varlen kernel."""
    from tunelab.models import varlen

    model = tiny_model_dir(tmp_path / "m")
    cfg = load_config(None, [
        f"model.name={model}", f"data.path={_data(tmp_path)}", f"train.output_dir={tmp_path}", "name=r",
        "model.precision=bf16", "train.max_steps=4", "train.micro_batch_size=4", "model.device=cuda",
        "train.packing=on",
    ])  # fmt: skip
    run = run_training(cfg, log=lambda *a: None)
    result = json.loads((run / "result.json").read_text())
    assert result["packed"] is True
    if varlen.kernel_available("cuda", __import__("torch").bfloat16):
        assert result["attention"] == varlen.NAME
