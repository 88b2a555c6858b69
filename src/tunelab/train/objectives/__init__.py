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

from tunelab.config.schema import Config
from tunelab.train.objectives.base import Objective


def get_objective(cfg: Config) -> Objective:
    from tunelab.train.objectives.dpo import DPO
    from tunelab.train.objectives.kto import KTO
    from tunelab.train.objectives.orpo import ORPO
    from tunelab.train.objectives.sft import SFT
    from tunelab.train.objectives.simpo import SimPO

    name = cfg.train.objective
    if name == "sft":
        return SFT()
    kinds = {"dpo": DPO, "kto": KTO, "simpo": SimPO, "orpo": ORPO}
    return kinds[name](cfg.train.preference)


__all__ = ["Objective", "get_objective"]
