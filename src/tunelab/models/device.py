"""Where a model runs and in which precision — decided once, from ``model.device`` and
``model.precision``, for training and evaluation alike, before anything is loaded.

``precision: auto`` is bf16 on a CUDA GPU that has it. On a CPU it is fp32, except for training
a model at least :data:`BF16_MIN_HIDDEN` wide on a CPU that computes bf16 natively (AVX512-BF16
or AMX) where a quick timing of a matrix product of the model's width shows bf16 at least
:data:`BF16_MIN_SPEEDUP` times faster; the timing is cached per machine and width, and the
choice and its reason are said when the run starts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config.schema import ModelConfig
from tunelab.errors import ConfigError
from tunelab.models.attention import NAME as MATMUL

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` on a CPU reads none
    import torch


BF16_MIN_HIDDEN = 256  # narrower matrices are overhead-bound: bf16 buys nothing there
BF16_MIN_SPEEDUP = 1.3
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 ("auto" resolved)
    reason: str = ""  # why, when "auto" chose it

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The compute dtype under autocast; None in fp32."""
        return None if self.precision == "fp32" else frozen_dtype(self.precision)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype forwards compute in: the autocast dtype, else fp32."""
        return frozen_dtype(self.precision)

    def weight_dtype(self, trains_base: bool) -> torch.dtype:
        """Weights that are trained stay fp32 (master weights, autocast computes in half);
        frozen weights (a LoRA base, a model being evaluated) can live in half precision."""
        return frozen_dtype("fp32" if trains_base else self.precision)

    def describe(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"{self.device.type} ({self.precision}{why})"


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype frozen weights are held in at ``precision`` (fp32, bf16, fp16)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch (~2 s of a `tunelab plan`) where
    the installed build is a CPU-only wheel: PyTorch versions those ``+cpu``."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False
    import torch

    return torch.cuda.is_available()


def choose_placement(cfg: ModelConfig, *, train_hidden: int | None = None) -> Placement:
    """(device, precision) for ``cfg`` on this machine — or a clear error naming the setting.
    ``train_hidden``: the width of a model about to be trained (lets ``auto`` pick bf16 on a CPU
    where it pays)."""
    import torch

    has_cuda = cuda_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ConfigError(
            "model.device: 'cuda' but this machine has no CUDA GPU (use model.device=auto or cpu)"
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = cfg.precision
    reason = ""
    if precision == "auto":
        if use_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif train_hidden is not None:
            precision, reason = cpu_training_precision(train_hidden)
        else:
            precision = "fp32"
    if precision == "fp16" and not use_cuda:
        raise ConfigError("model.precision: 'fp16' needs a CUDA GPU (use fp32 or bf16 on the CPU)")
    return Placement(device, precision, reason)


#: On a CPU, attention as grouped matmuls (models/attention.py) beats SDPA's kernel up to about
#: 512 tokens and loses beyond (the default model, bf16, fwd + bwd of 9 heads: 4 x 384 tokens
#: 21 against 39 ms, 4 x 512 49 against 65 ms, 2 x 768 61 against 46 ms; docs/speed.md).
MATMUL_MAX_LEN = 512

#: Rows of logits the LM head computes at a time (models/nll.py: the full [tokens, vocab] fp32
#: logits of a small model are most of its training memory). Here, torch-free, because
#: ``tunelab plan`` sizes those rows too (models/memory.py).
HEAD_CHUNK = 512


def training_attention(device: str, longest: int) -> str:
    """The attention to train with on ``device`` when no row is longer than ``longest`` tokens:
    ``sdpa`` on a GPU; on a CPU grouped matmuls (:data:`~tunelab.models.attention.NAME`) when
    every row is short enough, else ``<that>+sdpa`` — each micro-batch by its own width
    (:func:`batch_attention`)."""
    if device != "cpu":
        return "sdpa"
    return MATMUL if longest <= MATMUL_MAX_LEN else f"{MATMUL}+sdpa"


def batch_attention(width: int) -> str:
    """The attention for a CPU batch ``width`` tokens wide (``<matmul>+sdpa``)."""
    return MATMUL if width <= MATMUL_MAX_LEN else "sdpa"


def two_attentions(attention: str) -> bool:
    """Whether ``attention`` picks one of two per micro-batch (:func:`batch_attention`)."""
    return attention.endswith("+sdpa")


def cpu_training_precision(hidden: int) -> tuple[str, str]:
    """("bf16" or "fp32", why) for training a model ``hidden`` wide on this CPU."""
    if hidden < BF16_MIN_HIDDEN:
        return "fp32", f"auto: a model {hidden} wide gains nothing from bf16"
    flags = cpu_flags()
    native = [f for f in BF16_FLAGS if f in flags]
    if not native:
        return "fp32", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX)"
    speedup = bf16_speedup(hidden)
    timing = f"a {hidden}-wide matrix product runs {speedup:.1f}x as fast in bf16"
    if speedup < BF16_MIN_SPEEDUP:
        return "fp32", f"auto: {timing} (< {BF16_MIN_SPEEDUP}x)"
    return "bf16", f"auto: this CPU has {native[0].upper()} and {timing}"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_speedup(hidden: int) -> float:
    """fp32 time / bf16 time of a [256, hidden] x [hidden, 4 hidden] product on this machine,
    measured once per machine and width (cached in TUNELAB_HOME)."""
    import json

    from tunelab.files import atomic_write_json
    from tunelab.models.catalog import home

    cache = home() / "bf16_speedup.json"  # the key is known without importing torch
    key = f"{device_name('cpu')} torch {importlib.metadata.version('torch')} {hidden}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        import torch

        a, b = torch.randn(256, hidden), torch.randn(hidden, 4 * hidden)
        known[key] = round(_best_time(a, b) / _best_time(a.bfloat16(), b.bfloat16()), 3)
        atomic_write_json(cache, known)
    return known[key]


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int = 7) -> float:
    import time

    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def device_name(kind: str) -> str:
    """The device as the run history records it ('cuda:NVIDIA H100 80GB HBM3',
    'cpu:AMD EPYC 9R14 x2'): what ``tunelab plan`` calibrates its time by."""
    if kind == "cuda":
        import torch

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
