"""Load what a finished run folder holds — its base model with the adapter merged, or its full
weights — or any model, as one :class:`LoadedModel`. Evaluation uses it today; export, serving
and chat use the same function. (A run folder is a model name like any other to
:func:`tunelab.models.load.load_weights`; this adds its settings and a label.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config.schema import ModelConfig
from tunelab.models.device import choose_placement
from tunelab.models.load import RUN_CONFIG, load_model, run_adapter, run_final


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    label: str  # what was loaded, for reports
    adapter: str | None = None  # the adapter folder merged into the base, if any


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def load_run(target: str | Path, model_cfg: ModelConfig | None = None) -> LoadedModel:
    """A run folder (its ``final/``: the adapter merged into its base model, or the full
    weights) or any model name / folder / file, in eval mode, placed by ``model_cfg``'s device
    and precision (default: the run's own model settings, else ``auto``)."""
    from tunelab.config.load import load_config

    path = Path(target)
    if not is_run_folder(path):
        return _load(str(target), model_cfg or ModelConfig(), label=str(target))
    run_cfg = load_config(path / RUN_CONFIG)
    run_final(path)  # a clear error for an unfinished run, before anything loads
    adapter = run_adapter(str(path))
    settings = model_cfg or run_cfg.model
    if adapter is None:
        return _load(str(path), settings, label=f"{path.name} (full)")
    loaded = _load(str(path), settings, label=f"{run_cfg.model.name} + {path.name}")
    loaded.adapter = str(adapter[1])
    return loaded


def _load(name: str, settings: ModelConfig, *, label: str) -> LoadedModel:
    placement = choose_placement(settings)
    dtype = placement.weight_dtype(trains_base=False)
    model, tokenizer = load_model(name, dtype=dtype, device=str(placement.device))
    return LoadedModel(model.eval(), tokenizer, label)
