"""KTO (Ethayarajh et al. 2024): answers tagged good (desirable) or bad (undesirable), unpaired.

With r = log π(y|x) − log π_ref(y|x) (summed over the answer's tokens) and z₀ the reference
point, a KL estimate:

    desirable     λ_D (1 − σ(β (r − z₀)))
    undesirable   λ_U (1 − σ(β (z₀ − r)))

z₀ = max(0, mean over the micro-batch of log π(y'|x) − log π_ref(y'|x)) for *mismatched*
pairs: each example's prompt with another example's answer, computed without gradient, as
the paper and TRL do. The partner answer is fixed before training (a seeded derangement of
the examples), so it is the same in every epoch and on resume, and its reference
log-probability can be precomputed.

λ_D and λ_U default to weights that make both kinds count the same in all
(λ_D · n_D = λ_U · n_U, the paper's advice for unbalanced data), the larger kind at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tunelab.data.records import Example
from tunelab.data.tokenize import Encoded, TokenizedExample
from tunelab.errors import DataError, Problem
from tunelab.models.device import HEAD_CHUNK
from tunelab.train.objectives.pairs import (
    PreferenceObjective,
    Rows,
    collate_rows,
    example_refs,
    reference_logps,
    refuse_formats,
    score,
    seeded_derangement,
)

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch

DEFAULT_BETA = 0.1


@dataclass
class KTOBatch:
    rows: Rows  # each example's own answer
    kl: Rows  # each prompt with its partner's answer
    desirable: torch.Tensor  # bool [B]

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    def to(self, device) -> KTOBatch:
        return KTOBatch(self.rows.to(device), self.kl.to(device), self.desirable.to(device))


class KTO(PreferenceObjective):
    name = "kto"
    uses_reference = True

    def __init__(self, settings, chunk: int = HEAD_CHUNK):
        super().__init__(settings, chunk)
        self.weights = (settings.desirable_weight or 1.0, settings.undesirable_weight or 1.0)

    def check_data(self, examples: Sequence[Example]) -> None:
        refuse_formats(examples, "kto", self.name,
                       "instruction, output, kto_tag true/false: see docs/preference.md")  # fmt: skip
        kinds = {e.label for e in examples}
        if len(kinds) < 2 and examples:
            only = "true (desirable)" if True in kinds else "false (undesirable)"
            raise DataError(Problem(examples[0].source.file, None, "kto_tag",
                                    f"every record is tagged {only}: KTO needs both kinds of answer "
                                    "(its reference point compares them)"))  # fmt: skip

    def prepare(self, train: list[TokenizedExample], val: list[TokenizedExample], cfg) -> list[str]:
        """Balance the weights on the training set; give every example its mismatched answer."""
        n_d = sum(t.example.label is True for t in train)
        n_u = len(train) - n_d
        s = self.settings
        if s.desirable_weight is None and s.undesirable_weight is None:
            self.weights = (1.0, n_d / n_u) if n_d >= n_u else (n_u / n_d, 1.0)
        elif s.desirable_weight is None:
            self.weights = (s.undesirable_weight * n_u / n_d, s.undesirable_weight)
        elif s.undesirable_weight is None:
            self.weights = (s.desirable_weight, s.desirable_weight * n_d / n_u)
        for part, salt in ((train, 0), (val, 1)):
            partner = seeded_derangement(len(part), cfg.train.seed * 7919 + salt)
            for i, t in enumerate(part):
                t.kl = splice(t.seq, part[partner[i]].seq, cfg.data.max_seq_len)
        ratio = self.weights[0] * n_d / (self.weights[1] * n_u)
        return [f"kto: {n_d} desirable / {n_u} undesirable answers; weights "
                f"{self.weights[0]:.3g} / {self.weights[1]:.3g} (λ_D·n_D / λ_U·n_U = {ratio:.2f})"]  # fmt: skip

    def ref_rows(self, example: TokenizedExample) -> list[Encoded]:
        return [example.seq, example.kl]

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int) -> KTOBatch:
        import torch

        own, kl = example_refs(examples, 0), example_refs(examples, 1)
        desirable = torch.tensor([t.example.label is True for t in examples])
        return KTOBatch(collate_rows([t.seq for t in examples], pad_id, own, self.pad_to),
                        collate_rows([t.kl for t in examples], pad_id, kl, self.pad_to),
                        desirable)  # fmt: skip

    def weight(self, batch: KTOBatch) -> float:
        return float(batch.desirable.numel())

    def loss_sum(self, model: torch.nn.Module, batch: KTOBatch) -> torch.Tensor:
        import torch

        logps, counts = score(model, batch.rows, self.chunk)
        with torch.no_grad():
            kl_logps, _ = score(model, batch.kl, self.chunk)
        ref = reference_logps(model, batch.rows, self.reference)
        ref_kl = reference_logps(model, batch.kl, self.reference)
        return self.losses(logps, ref, kl_logps, ref_kl, batch.desirable, counts).sum()

    def losses(self, logps, ref, kl_logps, ref_kl, desirable, counts=None) -> torch.Tensor:
        import torch

        beta = self.settings.beta or DEFAULT_BETA
        z0 = (kl_logps - ref_kl).mean().clamp(min=0).detach()
        ratio = logps - ref
        w_d, w_u = self.weights
        losses = torch.where(desirable, w_d * (1 - torch.sigmoid(beta * (ratio - z0))),
                             w_u * (1 - torch.sigmoid(beta * (z0 - ratio))))  # fmt: skip
        reward = beta * ratio.detach()
        self.stats.add("kl", z0.reshape(1))
        if desirable.any():
            self.stats.add("chosen_reward", reward[desirable])
            self.stats.add("chosen_logp", logps[desirable])
        if (~desirable).any():
            self.stats.add("rejected_reward", reward[~desirable])
            self.stats.add("rejected_logp", logps[~desirable])
        return losses

    def pop_stats(self) -> dict[str, float]:
        out = self.stats.pop()
        if "chosen_reward" in out and "rejected_reward" in out:
            out["margin"] = round(out["chosen_reward"] - out["rejected_reward"], 6)
        return out


def splice(own: Encoded, other: Encoded, limit: int) -> Encoded:
    """``own``'s prompt followed by ``other``'s answer (token level, as TRL joins prompt and
    completion ids), cut to ``limit`` tokens."""
    head = int(np.flatnonzero(own.response)[0])
    tail = int(np.flatnonzero(other.response)[0])
    ids = np.concatenate([own.input_ids[:head], other.input_ids[tail:]])[:limit]
    weights = np.concatenate([own.weights[:head], other.weights[tail:]])[:limit]
    response = np.concatenate([np.zeros(head, bool), other.response[tail:]])[:limit]
    return Encoded(ids, weights, response)
