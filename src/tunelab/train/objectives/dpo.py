"""DPO (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023), against a reference model.

With Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)), summed over the
answer's tokens:

    sigmoid   −(1 − ε) log σ(β Δ) − ε log σ(−β Δ)       ε = label_smoothing (conservative DPO)
    ipo       (Δ' − 1 / (2β))²                          Δ' with each log-ratio divided by its
                                                         answer's token count (as TRL does)

Rewards (logged): β times each answer's log-ratio.
"""

from __future__ import annotations

from tunelab.train.objectives.pairs import PreferencePairs, halves

DEFAULT_BETA = 0.1


class DPO(PreferencePairs):
    name = "dpo"
    uses_reference = True

    def pair_losses(self, logps, counts, ref, rows):
        import torch.nn.functional as F

        beta = self.settings.beta or DEFAULT_BETA
        policy_w, policy_l = halves(logps)
        ref_w, ref_l = halves(ref)
        ratio_w, ratio_l = policy_w - ref_w, policy_l - ref_l
        if self.settings.dpo_loss == "ipo":
            n_w, n_l = halves(counts.clamp(min=1))
            losses = (ratio_w / n_w - ratio_l / n_l - 1 / (2 * beta)) ** 2
        else:
            eps, delta = self.settings.label_smoothing, ratio_w - ratio_l
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        self.log_rewards(beta * ratio_w, beta * ratio_l, logps, counts)
        return losses
