"""``model.precision: auto`` on a CPU: bf16 for training only where this CPU computes it
natively and a quick timing at the model's width shows it pays; fp32 otherwise, with the reason
said. (The parity of bf16 training with fp32 is in tests/integration/test_speed.py.)"""

import pytest

from tunelab.config.schema import ModelConfig
from tunelab.models import device


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    state = {"flags": {"avx512f", "avx512_bf16"}, "times": {"float32": 3.0, "bfloat16": 1.0}}
    monkeypatch.setattr(device, "cpu_flags", lambda: state["flags"])
    timed = []

    def best_time(a, b):
        timed.append(a.dtype)
        return state["times"][str(a.dtype).removeprefix("torch.")]

    monkeypatch.setattr(device, "_best_time", best_time)
    state["timed"] = timed
    return state


def _choose(hidden, precision="auto"):
    return device.choose_placement(ModelConfig(precision=precision), train_hidden=hidden)


def test_bf16_where_the_cpu_has_it_and_it_pays(cpu):
    placement = _choose(576)
    assert placement.precision == "bf16"
    assert "AVX512_BF16" in placement.reason and "3.0x" in placement.reason
    assert "bf16: auto" in placement.describe()


def test_fp32_otherwise_with_the_reason(cpu):
    assert _choose(64).precision == "fp32" and "64 wide" in _choose(64).reason
    assert device.choose_placement(ModelConfig()).precision == "fp32"  # evaluation: fp32
    assert _choose(576, "fp32").precision == "fp32" and _choose(576, "fp32").reason == ""
    cpu["times"]["bfloat16"] = 2.5
    assert _choose(1024).precision == "fp32" and "1.2x" in _choose(1024).reason
    cpu["flags"] = {"avx512f"}
    assert _choose(2048).precision == "fp32" and "no native bf16" in _choose(2048).reason


def test_the_timing_is_done_once_per_machine_and_width(cpu):
    _choose(576)
    _choose(576)
    assert len(cpu["timed"]) == 2  # fp32 and bf16, once
    _choose(768)
    assert len(cpu["timed"]) == 4


def test_matmul_attention_for_short_sequences_on_a_cpu_only():
    """Every row short: matmuls; some longer: each micro-batch by its width; a GPU: SDPA."""
    matmul = "tunelab_matmul"
    assert device.training_attention("cpu", 110) == matmul
    assert device.training_attention("cpu", device.MATMUL_MAX_LEN) == matmul
    assert device.training_attention("cpu", device.MATMUL_MAX_LEN + 1) == f"{matmul}+sdpa"
    assert device.training_attention("cuda", 110) == "sdpa"
    assert device.batch_attention(device.MATMUL_MAX_LEN) == matmul
    assert device.batch_attention(device.MATMUL_MAX_LEN + 1) == "sdpa"
