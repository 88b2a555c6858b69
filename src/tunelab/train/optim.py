"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from tunelab.config.schema import TrainConfig


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, device: str
):
    """AdamW over ``named_params``; no weight decay on biases, norms and embeddings' 1-D params.

    Parameters that are frozen now but may be unfrozen later can be included: AdamW skips a
    parameter whose ``.grad`` is None.
    """
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
    """Multiplier of the peak LR for the update made at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup + 1) / span) if total > warmup else 1.0
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step, total=total_steps, warmup=warmup, schedule=cfg.schedule, floor=cfg.min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
