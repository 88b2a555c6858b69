"""Which examples go into which micro-batch of which optimizer step.

The order is a pure function of (seed, epoch), so a resumed run recomputes it instead of
storing it: step k of epoch e always sees the same examples. With ``group_by_length`` each
shuffled window of 16 micro-batches is sorted by length before it is cut, which cuts padding
without making the order depend on anything but the seed.

With ``max_tokens`` (``train.micro_batch_tokens``) each step keeps its sequences but runs them in
as few micro-batches as fit that many padded tokens (rows x the longest row), longest first.
The step's gradient does not change — accumulation divides by the step's total loss weight — so
this is a speed choice: fewer, fuller forwards.

With ``replay_ratio`` (``data.replay``) every step holds ``replay_per_step`` examples of a
replay pool — indices ``n ..`` after the ``n`` task examples, attached by
:func:`tunelab.train.replay.attach` — and the task examples fill the rest: an epoch is a pass
over the task examples. The pool is drawn in a shuffled order (a new shuffle each time it is
used up), a pure function of the seed and the global step, so a resumed run draws the same.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence


def token_budget(setting: int | str | None, micro_batch_size: int, lengths: Sequence[int]):
    """``train.micro_batch_tokens`` in tokens: ``auto`` is ``micro_batch_size`` rows of the
    longest sequence — the widest forward the config already allows (and ``tunelab plan``
    quotes memory for), filled with more, shorter rows where the step has them."""
    if setting == "auto":
        return micro_batch_size * max(lengths)
    return setting


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
        replay_per_step: int = 0,
    ):
        if not lengths:
            raise ValueError("no examples to plan")
        if not 0 <= replay_per_step < micro_batch_size * grad_accum:
            raise ValueError(f"replay_per_step {replay_per_step} must leave room for the task")
        self.lengths = list(lengths)
        self.n = len(self.lengths)  # the task examples; a replay pool's come after
        self.mbs = micro_batch_size
        self.ga = grad_accum
        self.seed = seed
        self.group = group_by_length
        self.max_tokens = token_budget(max_tokens, micro_batch_size, self.lengths)
        self.replay_per_step = replay_per_step
        self.replay = 0  # the replay pool's size, once attached

    @property
    def task_per_step(self) -> int:
        return self.mbs * self.ga - self.replay_per_step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.task_per_step)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.floor(epochs * self.steps_per_epoch))

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The steps of one epoch; each step is a list of micro-batches of example indices."""
        if self.replay_per_step:
            return self._epoch_with_replay(epoch)
        order = list(range(self.n))
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
        if self.max_tokens:
            return [self.regroup(step) for step in steps]
        return [_no_lone_last_row(step) for step in steps]

    def _epoch_with_replay(self, epoch: int) -> list[list[list[int]]]:
        """Each step: ``task_per_step`` task examples (shuffled per epoch), longest first, then
        its ``replay_per_step`` replay examples, cut into micro-batches. Before the pool is
        attached (self-rehearsal's is generated after planning) the steps hold their task
        examples only: what planning estimates from, never what trains (recipe.train checks)."""
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        steps = []
        for j, start in enumerate(range(0, self.n, self.task_per_step)):
            task = order[start : start + self.task_per_step]
            if self.group:
                task.sort(key=lambda i: -self.lengths[i])
            seqs = task + (self.replayed(epoch * self.steps_per_epoch + j) if self.replay else [])
            micro = [seqs[i : i + self.mbs] for i in range(0, len(seqs), self.mbs)]
            steps.append(self.regroup(micro) if self.max_tokens else _no_lone_last_row(micro))
        return steps

    def replayed(self, global_step: int) -> list[int]:
        """The replay examples of a step: the next ``replay_per_step`` of the pool's order,
        shuffled anew (seeded) each time the pool is used up."""
        out = []
        for p in range(
            global_step * self.replay_per_step, (global_step + 1) * self.replay_per_step
        ):
            cycle, at = divmod(p, self.replay)
            out.append(self.n + self._replay_order(cycle, self.replay)[at])
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of plans live at once
    def _replay_order(self, cycle: int, size: int) -> list[int]:
        order = list(range(size))
        random.Random(self.seed * 1_000_003 + 7_919 * (cycle + 1)).shuffle(order)
        return order

    def regroup(self, step: list[list[int]]) -> list[list[int]]:
        """The step's sequences, longest first, cut into micro-batches of at most
        ``max_tokens`` padded tokens (a longer single sequence gets a micro-batch alone), with
        no lone last row where the micro-batch before can spare one (:func:`_no_lone_last_row`;
        the row it gives is no wider than its own, so the budget holds)."""
        out: list[list[int]] = []
        for i in sorted((i for micro in step for i in micro), key=lambda j: -self.lengths[j]):
            if out and (len(out[-1]) + 1) * self.lengths[out[-1][0]] <= self.max_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return _no_lone_last_row(out)

    def progress(self, global_step: int) -> float:
        """Epochs done once step ``global_step`` (0-based) is: 1.5 halfway through the second."""
        epoch, within = divmod(global_step, self.steps_per_epoch)
        return round(epoch + (within + 1) / self.steps_per_epoch, 4)

    def marks(self, global_step: int) -> dict:
        """What a step's log record says of where it is besides the epoch (stages: the stage)."""
        return {}

    def step(self, global_step: int) -> tuple[int, list[list[int]]]:
        """(epoch, micro-batches) of a global step, 0-based."""
        epoch, within = divmod(global_step, self.steps_per_epoch)
        return epoch, self.epoch(epoch)[within]


def _no_lone_last_row(step: list[list[int]]) -> list[list[int]]:
    """A step whose last micro-batch is one row takes the last row of the micro-batch before
    it when that one keeps two or more: a compiled layer graph treats one row as a shape of its
    own (torch specialises sizes 0 and 1), and a new graph at the end of a run cost ~20 s. The
    step's rows, and so its gradient, stay the same."""
    if len(step) > 1 and len(step[-1]) == 1 and len(step[-2]) > 2:
        step[-1].insert(0, step[-2].pop())
    return step
