"""What the preference objectives share: scored rows, their log-probabilities, the reference
and the per-step statistics.

A preference objective scores whole answers: the log-probability of an answer is the sum of
the log-probabilities of its tokens (the reply and its closing EOS; the prompt is never
scored, so ``data.prompt_loss_weight`` has no meaning for the preference term). Chosen and
rejected answers go through the model in **one forward pass**: the batch holds the chosen rows
first, then the rejected ones.

The reference model's log-probabilities come either with the batch (precomputed once before
training and cached in the run folder, :mod:`tunelab.train.reference`) or from
``objective.reference``, a function computing them without gradient (the base with the LoRA
adapter disabled, or a frozen copy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tunelab.data.collate import Batch, collate
from tunelab.data.records import Example
from tunelab.data.tokenize import Encoded, TokenizedExample
from tunelab.errors import DataError, Problem
from tunelab.models.device import HEAD_CHUNK

if TYPE_CHECKING:  # torch and the loss are imported where used: `tunelab plan` reads neither
    import torch

#: (model, rows) -> reference log-probability of each row, computed without gradient.
ReferenceFn = Callable[["torch.nn.Module", "Rows"], "torch.Tensor"]


@dataclass
class Rows:
    """Sequences scored as whole answers, padded into one batch."""

    tokens: Batch
    response: torch.Tensor  # bool [N, T]: the answer's tokens (as targets)
    ref: torch.Tensor | None  # float32 [N]: precomputed reference log-probabilities, or None

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def to(self, device) -> Rows:
        ref = None if self.ref is None else self.ref.to(device)
        return Rows(self.tokens.to(device), self.response.to(device), ref)


def collate_rows(
    seqs: Sequence[Encoded], pad_id: int, refs: Sequence[float] | None, pad_to: int | None = None
) -> Rows:
    import torch

    tokens = collate(seqs, pad_id, pad_to_multiple_of=pad_to)
    response = torch.zeros(tokens.input_ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        response[i, : len(s)] = torch.from_numpy(s.response)
    ref = None if refs is None else torch.tensor(refs, dtype=torch.float32)
    return Rows(tokens, response, ref)


def example_refs(examples: Sequence[TokenizedExample], slot: int) -> list[float] | None:
    """The precomputed reference log-probabilities of slot ``slot`` of each example, or None
    when they are not precomputed."""
    if any(t.ref is None for t in examples):
        return None
    return [t.ref[slot] for t in examples]


def score(model: torch.nn.Module, rows: Rows, chunk: int = HEAD_CHUNK):
    """(sum of the answer's token log-probabilities [N], number of answer tokens [N])."""
    import torch

    from tunelab.models.nll import token_logps

    b = rows.tokens
    per_token = token_logps(model, b.input_ids, b.attention_mask, b.position_ids,
                            rows.response, chunk)  # fmt: skip
    return per_token.sum(-1), rows.response[:, 1:].sum(-1).to(torch.float32)


def reference_logps(model, rows: Rows, reference: ReferenceFn | None) -> torch.Tensor:
    import torch

    if rows.ref is not None:
        return rows.ref
    if reference is None:
        raise RuntimeError("no reference log-probabilities: precompute them or set a reference")
    with torch.no_grad():
        return reference(model, rows).detach()


class Stats:
    """Sums of per-pair statistics over the micro-batches of a step (or an evaluation);
    :meth:`pop` returns their means and starts again."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, values: torch.Tensor) -> None:
        """Summed on the device (float64): no host sync per statistic; :meth:`pop` syncs once."""
        self.sums[name] = self.sums[name] + values.detach().double().sum()
        self.counts[name] += values.numel()

    def pop(self) -> dict[str, float]:
        out = {
            k: round(float(self.sums[k]) / self.counts[k], 6) for k in self.sums if self.counts[k]
        }
        self.sums.clear()
        self.counts.clear()
        return out


def refuse_formats(examples: Sequence[Example], accepted: str, objective: str, hint: str) -> None:
    """A DataError naming the first records the objective cannot learn from."""
    problems = [
        Problem(e.source.file, e.source.line, "format",
                f"this {e.format} record cannot be trained with train.objective={objective}: "
                f"it needs {accepted} records ({hint})")
        for e in examples if e.format != accepted
    ]  # fmt: skip
    if problems:
        raise DataError(problems[:20], total=len(problems), cap=20)


class PreferenceObjective:
    can_pack = False  # its sums are per sequence: rows stay padded
    """What every preference objective holds: its settings (``train.preference``), the
    reference function the recipe sets, and the statistics it logs."""

    name = "preference"
    uses_reference = True

    def __init__(self, settings, chunk: int = HEAD_CHUNK):
        self.settings = settings
        self.chunk = chunk
        self.reference: ReferenceFn | None = None
        self.stats = Stats()
        self.pad_to: int | None = None  # pad widths to a multiple of this (set by the plan)

    def pop_stats(self) -> dict[str, float]:
        return self.stats.pop()


class PreferencePairs(PreferenceObjective):
    """The shared part of DPO, SimPO and ORPO: pairs in, per-pair losses out.

    Subclasses set ``name`` and ``uses_reference`` and implement :meth:`pair_losses`."""

    def check_data(self, examples: Sequence[Example]) -> None:
        refuse_formats(examples, "preference", self.name,
                       "prompt, chosen, rejected: see docs/preference.md")  # fmt: skip

    def prepare(self, train: list[TokenizedExample], val: list[TokenizedExample], cfg) -> list[str]:
        return []

    def ref_rows(self, example: TokenizedExample) -> list[Encoded]:
        """The rows whose reference log-probability the loss needs (precomputed once)."""
        return [example.seq, example.rejected] if self.uses_reference else []

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int) -> Rows:
        seqs = [t.seq for t in examples] + [t.rejected for t in examples]
        chosen, rejected = example_refs(examples, 0), example_refs(examples, 1)
        refs = None if chosen is None or not self.uses_reference else chosen + rejected
        return collate_rows(seqs, pad_id, refs, self.pad_to)

    def weight(self, rows: Rows) -> float:
        return rows.tokens.input_ids.shape[0] / 2  # pairs: losses are per pair, summed

    def loss_sum(self, model: torch.nn.Module, rows: Rows) -> torch.Tensor:
        logps, counts = score(model, rows, self.chunk)
        ref = reference_logps(model, rows, self.reference) if self.uses_reference else None
        return self.pair_losses(logps, counts, ref, rows).sum()

    def pair_losses(self, logps, counts, ref, rows: Rows) -> torch.Tensor:
        raise NotImplementedError

    def log_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, logps, counts) -> None:
        """The statistics every preference objective logs, per pair."""
        half = logps.shape[0] // 2
        self.stats.add("chosen_reward", chosen)
        self.stats.add("rejected_reward", rejected)
        self.stats.add("margin", chosen - rejected)
        self.stats.add("reward_accuracy", (chosen > rejected).float())
        self.stats.add("chosen_logp", logps[:half])
        self.stats.add("rejected_logp", logps[half:])
        self.stats.add("chosen_logp_per_token", logps[:half] / counts[:half].clamp(min=1))
        self.stats.add("rejected_logp_per_token", logps[half:] / counts[half:].clamp(min=1))


def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = t.shape[0] // 2
    return t[:half], t[half:]


def seeded_derangement(n: int, seed: int) -> np.ndarray:
    """partner[i] != i for n > 1: a seeded random cycle through all indices."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner
