"""A run in stages (``stages:`` in the config; docs/forgetting.md): one after another, each from
the previous stage's weights, in one run folder with one loss curve.

Every stage is a step plan of its own (train/batches.py) over its data — with, when it replays
earlier stages, their examples as its replay pool — placed end to end on one global step count:
stage ``i`` runs global steps ``start_i .. start_i + steps_i - 1``. Its learning rate follows
its own schedule (warmup and decay over its steps, its own peak). Like a one-stage run, which
examples go into global step ``k`` and at what learning rate is a pure function of the config,
so a checkpoint of any step — a stage's last included — resumes exactly; the optimizer (AdamW)
carries its state across the boundary.

The examples of every stage live in one list (the plan's ``train``): the last stage's training
part first (its validation share is the run's validation set), then the earlier stages' in
order; each stage maps its local indices to that list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.config.schema import Config
from tunelab.data.pipeline import load_examples, tokenize_examples
from tunelab.errors import ConfigError, DataError, Problem
from tunelab.train.batches import StepPlan
from tunelab.train.optim import Schedule
from tunelab.train.replay import whole_share


@dataclass
class Stage:
    name: str
    start: int  # its first global step
    steps: int
    plan: StepPlan
    index: list[int]  # local example index -> index in the run's train list
    lr: float
    replays: str  # "" or "general at 0.25"


class StagedSteps:
    """The step plan of a run in stages, with StepPlan's interface on global steps."""

    def __init__(self, stages: list[Stage], lengths: list[int]):
        self.stages, self.lengths = stages, lengths
        self.n = len(lengths)
        self.replay_per_step, self.replay = 0, 0  # (data.replay is refused with stages)
        self.mbs, self.ga = stages[-1].plan.mbs, stages[-1].plan.ga

    def total_steps(self, epochs=None, max_steps: int | None = None) -> int:
        total = self.stages[-1].start + self.stages[-1].steps
        return min(total, max_steps) if max_steps else total

    @property
    def steps_per_epoch(self) -> int:
        return self.stages[-1].plan.steps_per_epoch

    def stage_at(self, step: int) -> Stage:
        return next((s for s in self.stages if step < s.start + s.steps), self.stages[-1])

    def step(self, global_step: int) -> tuple[int, list[list[int]]]:
        stage = self.stage_at(global_step)
        epoch, micro = stage.plan.step(global_step - stage.start)
        return epoch, [[stage.index[i] for i in mb] for mb in micro]

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The last stage's epoch (what planning estimates padding from)."""
        stage = self.stages[-1]
        return [[[stage.index[i] for i in mb] for mb in step] for step in stage.plan.epoch(epoch)]

    def progress(self, global_step: int) -> float:
        stage = self.stage_at(global_step)
        return stage.plan.progress(global_step - stage.start)

    def marks(self, global_step: int) -> dict:
        return {"stage": self.stage_at(global_step).name}

    def describe(self) -> str:
        return "; ".join(f"{i + 1}. {s.name}: steps {s.start + 1}-{s.start + s.steps} at lr {s.lr:g}"
                         + (f", replaying {s.replays}" if s.replays else "")
                         for i, s in enumerate(self.stages))  # fmt: skip


class StagedSchedule:
    """Each stage's learning-rate schedule, on the global step."""

    def __init__(self, cfg: Config, steps: StagedSteps):
        self.steps = steps
        self.each = [
            Schedule(cfg.train.model_copy(update={"lr": s.lr}), s.steps) for s in steps.stages
        ]

    def lr(self, step: int) -> float:
        stage = self.steps.stage_at(step)
        return self.each[self.steps.stages.index(stage)].lr(step - stage.start)

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def check_stages(cfg: Config) -> None:
    """What a run in stages cannot be, refused before anything is read."""
    if not cfg.stages:
        return
    if cfg.data.path:
        raise ConfigError("data.path: with stages each stage names its data (stages[i].data); "
                          "remove data.path")  # fmt: skip
    if cfg.data.replay:
        raise ConfigError("data.replay: with stages a stage replays earlier stages "
                          "(stages[i].replay, stages[i].replay_ratio); remove data.replay")  # fmt: skip
    for i, stage in enumerate(cfg.stages):
        if not Path(stage.data).is_file():
            raise DataError(Problem(stage.data, None, None, f"stages[{i}].data: file not found"))


def staged_steps(cfg: Config, tokenizer, train: list) -> StagedSteps:
    """Every stage's step plan on one global step count; ``train`` (the last stage's training
    examples) gets the earlier stages' examples after it."""
    t = cfg.train
    spans = {cfg.stages[-1].name: list(range(len(train)))}  # stage -> its examples in train
    for stage in cfg.stages[:-1]:
        pool = tokenize_examples(load_examples(stage.data, cfg.data), tokenizer, cfg.data).examples
        if len(pool) < t.micro_batch_size:
            raise DataError(Problem(stage.data, None, None, f"stage {stage.name!r}: {len(pool)} usable "
                                    f"examples, fewer than one micro-batch"))  # fmt: skip
        spans[stage.name] = list(range(len(train), len(train) + len(pool)))
        train.extend(pool)
    stages, start = [], 0
    for i, stage in enumerate(cfg.stages):
        own = spans[stage.name]
        pool = [j for name in stage.replay for j in spans[name]]
        k = whole_share(cfg, stage.replay_ratio, f"stages[{i}].replay_ratio") if pool else 0
        plan = StepPlan([len(train[j].seq) for j in own], micro_batch_size=t.micro_batch_size,
                        grad_accum=t.grad_accum, seed=t.seed + i, replay_per_step=k)  # fmt: skip
        if pool:
            plan.lengths.extend(len(train[j].seq) for j in pool)
            plan.replay = len(pool)
        steps = stage.max_steps or max(
            1, math.floor((stage.epochs or t.epochs) * plan.steps_per_epoch)
        )
        replays = f"{', '.join(stage.replay)} at {stage.replay_ratio:g}" if pool else ""
        stages.append(Stage(stage.name, start, steps, plan, own + pool, stage.lr or t.lr, replays))
        start += steps
    return StagedSteps(stages, [len(x.seq) for x in train])
