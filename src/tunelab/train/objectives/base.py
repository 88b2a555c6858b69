"""The contract of an objective: losses are *summed*, so gradient accumulation is exact.

An objective says three things about its data and batches:

* ``check_data(examples)``: refuse records it cannot learn from (before any model loads);
* ``collate(examples, pad_id)``: the batch it needs from tokenized examples; an objective
  that ``can_pack`` (SFT) packs a micro-batch into one row when the plan sets its ``pack``
  (``train.packing``), and pads a batch's width to a multiple of its ``pad_to`` when the
  plan sets one (:func:`tunelab.train.speed.pad_multiple`);
* ``weight(batch)``, its share of the optimizer step's normaliser, and
  ``loss_sum(model, batch)``, the weighted loss summed over it.

The loop divides every micro-batch's sum by the total weight of the whole step before
``backward``, so

    step loss = sum over the step's tokens of w_t * NLL_t  /  sum over the step's tokens of w_t

whatever the micro-batch size and number of accumulation steps (RELIABILITY 1 and 2). An
objective with two terms of different units (ORPO: tokens and pairs) returns a vector of sums
from ``loss_sum`` and the matching vector of weights; each term is normalised on its own and
the terms are added.

The preference objectives add:

* ``uses_reference``: whether the loss compares with a reference model; ``reference`` is the
  function that scores rows with it when its log-probabilities are not precomputed, and
  ``ref_rows(example)`` the rows whose reference log-probabilities are precomputed;
* ``prepare(train, val, cfg)``: per-dataset setup before training (KTO's weights and its
  mismatched answers), returning notes for the user;
* ``pop_stats()``: rewards, margin, accuracy... averaged since the last call (logged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from tunelab.data.records import Example
from tunelab.data.tokenize import TokenizedExample

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch


class Objective(Protocol):
    name: str
    uses_reference: bool
    can_pack: bool
    pad_to: int | None
    reference: object  # (model, rows) -> log-probabilities, set by the recipe; None for SFT

    def check_data(self, examples: Sequence[Example]) -> None: ...

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int): ...

    def weight(self, batch) -> float: ...

    def loss_sum(self, model: torch.nn.Module, batch) -> torch.Tensor: ...

    def prepare(
        self, train: list[TokenizedExample], val: list[TokenizedExample], cfg
    ) -> list[str]: ...

    def ref_rows(self, example: TokenizedExample) -> list: ...

    def pop_stats(self) -> dict[str, float]: ...
