"""The contract of an objective: losses are *summed*, so gradient accumulation is exact.

An objective says three things about its data and batches:

* ``check_data(examples)``: refuse records it cannot learn from (before any model loads);
* ``collate(examples, pad_id)``: the batch it needs from tokenized examples;
* ``weight(batch)``, its share of the optimizer step's normaliser, and
  ``loss_sum(model, batch)``, the weighted loss summed over it.

The loop divides every micro-batch's sum by the total weight of the whole step before
``backward``, so

    step loss = sum over the step's tokens of w_t * NLL_t  /  sum over the step's tokens of w_t

whatever the micro-batch size and number of accumulation steps (RELIABILITY 1 and 2). The loop
knows nothing else about the objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tunelab.data.records import Example
from tunelab.data.tokenize import TokenizedExample


class Objective(Protocol):
    name: str

    def check_data(self, examples: Sequence[Example]) -> None: ...

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int): ...

    def weight(self, batch) -> float: ...

    def loss_sum(self, model: torch.nn.Module, batch) -> torch.Tensor: ...
