"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tunelab.config.schema import TrainConfig

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, device: str
):
    """AdamW over ``named_params``; no weight decay on biases, norms and embeddings' 1-D params.

    Parameters that are frozen now but may be unfrozen later can be included: AdamW skips a
    parameter whose ``.grad`` is None.
    """
    import torch

    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device == "cuda" and all(
        p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=fused or None)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier of the peak LR for the update made at ``step`` (0-based, of ``total``).

    Warmup climbs linearly to the peak, reached at the last warmup step (the first update is
    not at 0). The decay then starts at the peak and moves towards the floor without reaching
    it: the last update of the run is still a real one (the floor is where step ``total``
    would be)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


class Schedule:
    """The learning rate of every step, a pure function of (step, total steps): a resumed run
    recomputes it instead of restoring it, and extending a run (``--resume
    train.max_steps=N``) recomputes the curve over the new total."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        self.peak, self.total = cfg.lr, total_steps
        self.warmup = warmup_steps(cfg, total_steps)
        self.kind, self.floor = cfg.schedule, cfg.min_lr_ratio

    def lr(self, step: int) -> float:
        factor = lr_factor(
            step, total=self.total, warmup=self.warmup, schedule=self.kind, floor=self.floor
        )
        return self.peak * factor

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's learning rate for the update made at ``step``."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
