"""Where a model runs and in which precision — decided once, from ``model.device`` and
``model.precision``, for training and evaluation alike, before anything is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import ConfigError

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 ("auto" resolved)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The compute dtype under autocast; None in fp32."""
        return _HALF.get(self.precision)

    def weight_dtype(self, trains_base: bool) -> torch.dtype:
        """Weights that are trained stay fp32 (master weights, autocast computes in half);
        frozen weights (a LoRA base, a model being evaluated) can live in half precision."""
        return torch.float32 if trains_base else frozen_dtype(self.precision)

    def describe(self) -> str:
        return f"{self.device.type} ({self.precision})"


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype frozen weights are held in at ``precision`` (fp32, bf16, fp16)."""
    return _HALF.get(precision, torch.float32)


def choose_placement(cfg: ModelConfig) -> Placement:
    """(device, precision) for ``cfg`` on this machine — or a clear error naming the setting."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ConfigError(
            "model.device: 'cuda' but this machine has no CUDA GPU (use model.device=auto or cpu)"
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not use_cuda:
        raise ConfigError("model.precision: 'fp16' needs a CUDA GPU (use fp32 or bf16 on the CPU)")
    return Placement(device, precision)


def device_name(kind: str) -> str:
    """The device as the run history records it ('cuda:NVIDIA H100 80GB HBM3',
    'cpu:AMD EPYC 9R14 x2'): what ``tunelab plan`` calibrates its time by."""
    if kind == "cuda":
        return f"cuda:{torch.cuda.get_device_name(0)}"
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model} x{os.cpu_count()}"
