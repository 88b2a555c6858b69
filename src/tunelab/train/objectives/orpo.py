"""ORPO (Hong et al. 2024): supervised fine-tuning on the chosen answer plus an odds-ratio term
that pushes the rejected answer down; no reference model.

    loss = Σ w_t NLL_t / Σ w_t  −  λ · mean over pairs of log σ(log odds(y_w) − log odds(y_l))

where odds(y) = p / (1 − p) with p the answer's mean token probability (log p = the mean token
log-probability), the SFT term runs over the chosen rows with the usual token weights
(``data.prompt_loss_weight`` applies to it), and λ = ``orpo_lambda``. The two terms have their
own normalisers (tokens and pairs), both summed over the whole optimizer step, so gradient
accumulation stays exact.

Rewards (logged, as TRL does): λ times each answer's mean token log-probability.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tunelab.train.objectives.pairs import PreferencePairs, Rows, halves

if TYPE_CHECKING:  # torch and the loss are imported where used: `tunelab plan` reads neither
    import torch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable near 0 and for very negative x."""
    import torch

    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO(PreferencePairs):
    name = "orpo"
    uses_reference = False

    def weight(self, rows: Rows) -> np.ndarray:
        from tunelab.models.nll import target_weights

        half = rows.tokens.input_ids.shape[0] // 2
        sft = float(target_weights(rows.tokens.loss_weights[:half]).sum())
        return np.array([sft, half], dtype=np.float64)

    def loss_sum(self, model: torch.nn.Module, rows: Rows) -> torch.Tensor:
        import torch

        from tunelab.models.nll import target_weights, token_logps

        b, half = rows.tokens, rows.tokens.input_ids.shape[0] // 2
        sft_targets = b.loss_weights > 0
        sft_targets[half:] = False
        per_token = token_logps(model, b.input_ids, b.attention_mask, b.position_ids,
                                rows.response | sft_targets, self.chunk)  # fmt: skip
        logps = (per_token * rows.response[:, 1:]).sum(-1)
        counts = rows.response[:, 1:].sum(-1).to(torch.float32)
        nll = -(per_token[:half] * target_weights(b.loss_weights[:half])).sum()
        odds = self.pair_losses(logps, counts, None, rows).sum()
        return torch.stack([nll, odds])

    def pair_losses(self, logps, counts, ref, rows):
        import torch.nn.functional as F

        lam = self.settings.orpo_lambda
        mean_w, mean_l = halves(logps / counts.clamp(min=1))
        log_odds = (mean_w - mean_l) - (log1mexp(mean_w) - log1mexp(mean_l))
        ratio = F.logsigmoid(log_odds)
        self.log_rewards(lam * mean_w, lam * mean_l, logps, counts)
        self.stats.add("log_odds_ratio", log_odds)
        return -lam * ratio
