"""What training optimises: one module per objective, each an :class:`~.base.Objective` that
owns its batch shape (``collate``) and its loss (``weight`` and ``loss_sum``).

    sft    weighted next-token NLL (prompt tokens at data.prompt_loss_weight)   (sft.py)

Selected by ``train.objective``; preference objectives (DPO, KTO, SimPO, ORPO) plug in beside.
"""

from __future__ import annotations

from tunelab.config.schema import Config
from tunelab.train.objectives.base import Objective


def get_objective(cfg: Config) -> Objective:
    from tunelab.train.objectives.sft import SFT

    return {"sft": SFT}[cfg.train.objective]()


__all__ = ["Objective", "get_objective"]
