"""``tunelab lr-find``: plan the run as ``tunelab train`` would, load the weights, run the
learning-rate range test (:mod:`tunelab.train.lr_find`) and write its result and plot. No run
folder is made and nothing is saved back: the model on disk is untouched."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.config.schema import Config
from tunelab.errors import ConfigError
from tunelab.train.lr_find import LrFind, lr_find, lr_find_setup, write_lr_find
from tunelab.train.plan import build_plan
from tunelab.train.recipe import load
from tunelab.train.reference import adapter_disabled, frozen_copy


def find_lr(
    cfg: Config, out_dir: Path, *, start: float, end: float, steps: int, progress=None
) -> LrFind:
    if not 0 < start < end:
        raise ConfigError(f"--start {start:g} must be positive and below --end {end:g}")
    plan = build_plan(cfg, read_weights=False)  # every check first; the run folder is not made
    model = load(plan)
    torch.manual_seed(cfg.train.seed)
    model = plan.method.apply(model)
    if plan.objective.uses_reference:  # no cache file: this is not a run
        plan.objective.reference = (
            frozen_copy(model) if plan.method.trains_base else adapter_disabled
        )
    dtype = plan.placement.autocast_dtype

    def autocast():
        return torch.autocast(plan.placement.device.type, dtype=dtype)

    result = lr_find(plan, model, start=start, end=end, steps=steps,
                     autocast=autocast if dtype is not None else None, progress=progress)  # fmt: skip
    result.setup = lr_find_setup(cfg)
    write_lr_find(result, out_dir)
    return result
