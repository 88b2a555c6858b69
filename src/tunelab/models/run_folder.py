"""Load what a finished run folder holds — its base model with the adapter merged, or its full
weights — or any model, as one :class:`LoadedModel`. Evaluation uses it today; export, serving
and chat use the same function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models.device import choose_placement
from tunelab.models.load import load_model

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    label: str  # what was loaded, for reports
    adapter: str | None = None  # the adapter folder merged into the base, if any


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def load_run(target: str | Path, model_cfg: ModelConfig | None = None) -> LoadedModel:
    """A run folder (its ``final/``: the adapter merged into its base model, or the full
    weights) or any model name / folder / file, in eval mode, placed by ``model_cfg``'s device
    and precision (default: the run's own model settings, else ``auto``)."""
    from tunelab.config.load import load_config

    path = Path(target)
    if not is_run_folder(path):
        return _load(str(target), model_cfg or ModelConfig(), label=str(target))
    run_cfg = load_config(path / "config.yaml")
    final = path / "final"
    if not final.is_dir():
        raise TunelabError(
            f"{path}: this run has no final/ folder yet (unfinished? resume it with --resume)"
        )
    settings = model_cfg or run_cfg.model
    if not (final / ADAPTER_CONFIG).is_file():
        return _load(str(final), settings, label=f"{path.name} (full)")
    from peft import PeftModel

    from tunelab.models.methods.lora import merge_and_unload
    from tunelab.models.tokenizer import load_tokenizer

    base = _load(run_cfg.model.name, settings, label="")
    model = merge_and_unload(PeftModel.from_pretrained(base.model, final))
    label = f"{run_cfg.model.name} + {path.name}"
    return LoadedModel(model.eval(), load_tokenizer(str(final)), label, str(final))


def _load(name: str, settings: ModelConfig, *, label: str) -> LoadedModel:
    placement = choose_placement(settings)
    dtype = placement.weight_dtype(trains_base=False)
    model, tokenizer = load_model(name, dtype=dtype, device=str(placement.device))
    return LoadedModel(model.eval(), tokenizer, label)
