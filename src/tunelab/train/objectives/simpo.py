"""SimPO (Meng et al. 2024): the reward is the answer's *mean* token log-probability times β,
no reference model, and a target margin γ between chosen and rejected:

    −(1 − ε) log σ(β (ℓ_w − ℓ_l) − γ) − ε log σ(−(β (ℓ_w − ℓ_l) − γ))      ℓ = log π(y|x) / |y|

(ε = label_smoothing, 0 by default: the paper's loss). The paper's defaults: β 2.0–2.5 and
γ/β about 0.5; tunelab uses β 2.0, γ 1.0.
"""

from __future__ import annotations

from tunelab.train.objectives.pairs import PreferencePairs, halves

DEFAULT_BETA = 2.0


class SimPO(PreferencePairs):
    name = "simpo"
    uses_reference = False

    def pair_losses(self, logps, counts, ref, rows):
        import torch.nn.functional as F

        beta, gamma = self.settings.beta or DEFAULT_BETA, self.settings.simpo_gamma
        mean_w, mean_l = halves(logps / counts.clamp(min=1))
        z = beta * (mean_w - mean_l) - gamma
        eps = self.settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        self.log_rewards(beta * mean_w, beta * mean_l, logps, counts)
        return losses
