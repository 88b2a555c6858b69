"""What training optimises: one module per objective, each an :class:`~.base.Objective` that
owns its batch shape (``collate``) and its loss (``weight`` and ``loss_sum``).

    sft    weighted next-token NLL (prompt tokens at data.prompt_loss_weight)   (sft.py)
    dpo    DPO / IPO / conservative DPO on preference pairs, against a reference (dpo.py)
    kto    KTO on answers tagged good or bad, against a reference              (kto.py)
    simpo  SimPO: length-normalised rewards with a margin, no reference        (simpo.py)
    orpo   ORPO: SFT on the chosen answer plus an odds-ratio term, no reference (orpo.py)

Selected by ``train.objective``; the preference objectives' settings are ``train.preference``.
"""

from __future__ import annotations

import importlib

from tunelab.config.schema import Config
from tunelab.train.objectives.base import Objective

#: train.objective -> (module, class); only the chosen one is imported
CLASSES = {"sft": ("sft", "SFT"), "dpo": ("dpo", "DPO"), "kto": ("kto", "KTO"),
           "simpo": ("simpo", "SimPO"), "orpo": ("orpo", "ORPO")}  # fmt: skip


def get_objective(cfg: Config) -> Objective:
    module, name = CLASSES[cfg.train.objective]
    kind = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return kind() if cfg.train.objective == "sft" else kind(cfg.train.preference)


__all__ = ["Objective", "get_objective"]
