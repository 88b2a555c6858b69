"""Which examples go into which micro-batch of which optimizer step.

The order is a pure function of (seed, epoch), so a resumed run recomputes it instead of
storing it: step k of epoch e always sees the same examples. With ``group_by_length`` each
shuffled window of 16 micro-batches is sorted by length before it is cut, which cuts padding
without making the order depend on anything but the seed.

With ``max_tokens`` (``train.micro_batch_tokens``) each step keeps its sequences but runs them in
as few micro-batches as fit that many padded tokens (rows x the longest row), longest first.
The step's gradient does not change — accumulation divides by the step's total loss weight — so
this is a speed choice: fewer, fuller forwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


class StepPlan:
    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        group_by_length: bool = True,
        max_tokens: int | None = None,
    ):
        if not lengths:
            raise ValueError("no examples to plan")
        self.lengths = list(lengths)
        self.mbs = micro_batch_size
        self.ga = grad_accum
        self.seed = seed
        self.group = group_by_length
        self.max_tokens = max_tokens

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / (self.mbs * self.ga))

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.floor(epochs * self.steps_per_epoch))

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The steps of one epoch; each step is a list of micro-batches of example indices."""
        order = list(range(len(self.lengths)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if self.group:
            window = self.mbs * 16
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda j: -self.lengths[j])
            ]
        micro = [order[i : i + self.mbs] for i in range(0, len(order), self.mbs)]
        steps = [micro[i : i + self.ga] for i in range(0, len(micro), self.ga)]
        return [self.regroup(step) for step in steps] if self.max_tokens else steps

    def regroup(self, step: list[list[int]]) -> list[list[int]]:
        """The step's sequences, longest first, cut into micro-batches of at most
        ``max_tokens`` padded tokens (a longer single sequence gets a micro-batch alone)."""
        out: list[list[int]] = []
        for i in sorted((i for micro in step for i in micro), key=lambda j: -self.lengths[j]):
            if out and (len(out[-1]) + 1) * self.lengths[out[-1][0]] <= self.max_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def step(self, global_step: int) -> tuple[int, list[list[int]]]:
        """(epoch, micro-batches) of a global step, 0-based."""
        epoch, within = divmod(global_step, self.steps_per_epoch)
        return epoch, self.epoch(epoch)[within]
