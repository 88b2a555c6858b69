"""The training loop, written out: no Trainer, no callbacks.

    for each optimizer step:
        plan its micro-batches; W = their total loss weight
        for each micro-batch: (loss_sum / W).backward()          optimizer_step
        guard (NaN/Inf), clip, step at the schedule's lr          optimizer_step, guard
        log                                                       log_step
        maybe evaluate, and stop early                            evaluate_due
        maybe checkpoint                                          checkpoint_due

Everything it works on is prepared by :mod:`tunelab.train.recipe` and passed in a :class:`Run`;
its state is a :class:`~tunelab.train.state.TrainState`, exactly what a checkpoint saves.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.checkpoint.manager import CheckpointManager
from tunelab.checkpoint.sharded import save_sharded
from tunelab.checkpoint.state import save_state
from tunelab.models.nll import perplexity
from tunelab.models.tokenizer import pad_id
from tunelab.train.distributed import clip_gradients, passes, sum_gradients
from tunelab.train.doctor import watch
from tunelab.train.guards import TrainingStopped, finite, is_oom, out_of_memory_message
from tunelab.train.optim import Schedule
from tunelab.train.plan import RunPlan
from tunelab.train.report import MetricsLog
from tunelab.train.state import Outcome, TrainState

TRAINED_FOLDER = "trained"  # the method's weights inside a checkpoint folder


@dataclass
class Run:
    """A prepared run: the plan, the model being trained and what changes it."""

    plan: RunPlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    state: TrainState
    metrics: MetricsLog
    checkpoints: CheckpointManager
    progress: Callable[[int, int, dict], None] | None = None  # (step, total, record)
    started: float = field(default_factory=time.perf_counter)  # for the wall time
    log: Callable[[str], None] = print  # lines for the user (train.doctor's warnings)
    said: set[str] = field(default_factory=set)  # what train.doctor has already warned about

    def autocast(self):
        return self.plan.autocast(self.model)

    def uncompiled(self):
        """Forwards outside the training step (validation, generation) run the compiled layers'
        eager code: under no_grad they would need graphs of their own, each a compilation
        (~20 s on a 2-core CPU) for a handful of forwards."""
        return torch.compiler.set_stance("force_eager")

    def batches(self, indices: list[list[int]], to_device: bool = True) -> list:
        pad, device = pad_id(self.plan.tokenizer), self.plan.placement.device
        objective, examples = self.plan.objective, self.plan.train
        batches = [objective.collate([examples[i] for i in mb], pad) for mb in indices]
        return [b.to(device) for b in batches] if to_device else batches


def train_loop(run: Run) -> Outcome:
    plan, state = run.plan, run.state
    started, tokens, last_loss, stop, first = time.perf_counter(), 0, None, False, state.step
    rates = []  # each step's real tokens/s
    run.model.train()
    plan.method.on_step(run.model, state.step)
    if plan.cfg.train.eval_at_start and plan.val and state.step == 0:
        evaluate_at_start(run)
    while state.step < plan.total_steps and not stop:
        record = optimizer_step(run)
        guard(run, record)
        log_step(run, record)
        tokens += record["tokens"]
        rates += [record["tokens_per_s"]] if record["tokens_per_s"] else []
        if not record.get("nan_skipped"):
            last_loss = record["loss"]
        eval_loss, improved, stop = evaluate_due(run)
        checkpoint_due(run, eval_loss, improved, stop)
        if eval_loss is not None:
            doctor_watch(run)
    seconds = time.perf_counter() - started
    steady = statistics.median(rates[1:]) if len(rates) >= 3 else None
    return Outcome(state.step, last_loss, stop, seconds, tokens, state.step - first, steady)


def optimizer_step(run: Run) -> dict:
    """One optimizer step: forward and backward every micro-batch, clip, step; the log record."""
    plan, state = run.plan, run.state
    step = state.step
    _, micro = plan.steps.step(step)
    plan.method.on_step(run.model, step)
    t0 = time.perf_counter()
    world = plan.world
    step_batches = run.batches(micro, to_device=not world.several)
    batches = run.batches(world.mine(micro)) if world.several else step_batches
    weight = sum((plan.objective.weight(b) for b in step_batches), 0.0)  # the whole step's
    # FSDP: as many passes on every rank (each gathers every layer); the extra ones add nothing
    missing = passes(micro, world) - len(batches) if plan.sharded else 0
    idle = run.batches(micro[:1]) * missing if missing else []
    try:
        loss = world.sum(
            accumulate(run.model, plan.objective, batches, run.autocast, run.scaler, weight, idle)
        )
    except Exception as e:
        if is_oom(e):
            raise TrainingStopped(
                out_of_memory_message(plan.cfg, plan.method, f"step {step + 1}")
            ) from None
        raise
    sum_gradients(_trained(run), plan.world)
    grad_norm = _clip(run)
    lr = run.schedule.apply(run.optimizer, step)
    ok = finite(loss, grad_norm)
    if ok:
        _step(run, step)
    run.optimizer.zero_grad(set_to_none=True)
    state.step = step + 1
    tokens = sum(b.num_tokens for b in step_batches)
    state.tokens += tokens
    if plan.placement.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "step": step + 1, "order": zlib.crc32(repr(micro).encode()), **plan.steps.marks(step),
        "epoch": plan.steps.progress(step), "loss": loss, "lr": lr,
        "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None, "seconds": round(dt, 3),
        **plan.objective.pop_stats(), **({} if ok else {"nan_skipped": True}),
    }  # fmt: skip


def accumulate(
    model,
    objective,
    batches: list,
    autocast=contextlib.nullcontext,
    scaler=None,
    step_weight=None,
    idle: list = (),
) -> float:
    """Forward and backward every micro-batch of one optimizer step; return the step's loss.

    Each micro-batch's summed loss is divided by the weight of the *whole step* (``step_weight``:
    default, these batches'; with several processes, every rank's), so the accumulated
    gradient equals that of one big batch (RELIABILITY 1). ``idle`` batches make passes that
    add nothing (their loss times zero): the collectives of a sharded model's other ranks."""
    if step_weight is None:
        step_weight = sum(objective.weight(b) for b in batches)
    total = 0.0
    for b, counts in [(b, True) for b in batches] + [(b, False) for b in idle]:
        with autocast():
            loss = normalise(objective.loss_sum(model, b), step_weight)
            loss = loss if counts else loss * 0.0
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
    return total


def _trained(run: Run) -> list[torch.nn.Parameter]:
    return [p for g in run.optimizer.param_groups for p in g["params"] if p.requires_grad]


def normalise(loss_sum: torch.Tensor, weight) -> torch.Tensor:
    """``loss_sum / weight``; for an objective with several terms (a vector of sums and of
    weights) each term by its own weight, then added."""
    if isinstance(weight, np.ndarray):
        return (
            loss_sum / torch.as_tensor(weight, dtype=loss_sum.dtype, device=loss_sum.device)
        ).sum()
    return loss_sum / weight


def _clip(run: Run) -> float:
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = run.plan.cfg.train.max_grad_norm
    max_norm = max_norm if max_norm is not None else float("inf")
    if run.plan.sharded:  # some gradients are shards: the norm is summed over the ranks
        return clip_gradients(params, max_norm, run.plan.world)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0


def _step(run: Run, step: int) -> None:
    """The update. Frozen parameters lose any gradient first (a zero one would still let
    AdamW's weight decay move them); the first step allocates AdamW's state, a common OOM."""
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                p.grad = None
    try:
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
    except Exception as e:
        if is_oom(e):
            where = f"the optimizer update of step {step + 1}"
            raise TrainingStopped(
                out_of_memory_message(run.plan.cfg, run.plan.method, where)
            ) from None
        raise


def guard(run: Run, record: dict) -> None:
    """A skipped (non-finite) step is counted; ``nan_action=stop`` or too many skips stop the
    run (the last checkpoint stays intact)."""
    if not record.get("nan_skipped"):
        return
    t, state = run.plan.cfg.train, run.state
    state.nan_skips += 1
    if t.nan_action == "stop":
        log_step(run, record)
        raise TrainingStopped(
            f"non-finite loss or gradient at step {record['step']} (loss {record['loss']}, grad norm "
            f"{record['grad_norm']}); train.nan_action=stop. The last checkpoint is intact; try a lower "
            f"train.lr (now {t.lr})."
        )
    if state.nan_skips > t.max_nan_skips:
        log_step(run, record)
        raise TrainingStopped(
            f"{state.nan_skips} steps had a non-finite loss or gradient (more than train.max_nan_skips="
            f"{t.max_nan_skips}); the learning rate (train.lr={t.lr}) is probably too high."
        )


def log_step(run: Run, record: dict) -> None:
    if not run.plan.world.main:  # rank 0 writes the log and shows the progress
        return
    run.metrics.append(record)
    if run.progress:
        run.progress(run.state.step, run.plan.total_steps, record)


def evaluate_at_start(run: Run) -> None:
    """The untrained model's validation loss: where the curve starts — and, when final/ keeps
    the best weights, a candidate like any later step (a checkpoint of step 0)."""
    loss = validation_loss(run)
    run.state.initial_eval_loss = loss
    run.state.observe_eval(loss)
    log_step(run, eval_record(run, 0, loss))
    if run.plan.keep == "best":
        save_checkpoint(run, loss)


def evaluate_due(run: Run) -> tuple[float | None, bool, bool]:
    """(validation loss or None, whether it is the best so far, whether to stop early)."""
    plan, state = run.plan, run.state
    done = state.step >= plan.total_steps
    if not plan.val or not (state.step % plan.eval_steps == 0 or done):
        return None, False, False
    loss = validation_loss(run)
    improved = state.observe_eval(loss)
    log_step(run, eval_record(run, state.step, loss))
    patience = plan.cfg.train.early_stopping_patience
    stop = bool(patience) and state.evals_without_improvement >= patience and not done
    return loss, improved, stop


def eval_record(run: Run, step: int, loss: float | None) -> dict:
    """The log record of an evaluation: the loss (and perplexity, where the loss is an NLL)
    and the objective's statistics on the validation set (rewards, margin, accuracy...)."""
    objective = run.plan.objective
    record = {"step": step, "eval_loss": loss}
    if getattr(objective, "reports_perplexity", False):
        record["eval_ppl"] = perplexity(loss)
    return record | {f"eval_{k}": v for k, v in objective.pop_stats().items()}


def doctor_watch(run: Run) -> None:
    """train.doctor: at an evaluation, what the curve so far says (once per kind of problem);
    with ``stop`` the run stops there, after its checkpoint."""
    setting, world = run.plan.cfg.train.doctor, run.plan.world
    if setting == "off":
        return
    findings = watch(MetricsLog.read(run.metrics.path), run.said) if world.main else None
    for finding in world.share(findings):  # rank 0 reads the log; every rank stops alike
        line = f"doctor at step {run.state.step}: {finding.kind}: {finding.evidence} -> {finding.advice}"
        if setting == "stop":
            raise TrainingStopped(f"{line} (train.doctor=stop; the last checkpoint is intact)")
        run.log(line)


def checkpoint_due(run: Run, eval_loss: float | None, improved: bool, stopping: bool) -> None:
    """Every ``save_steps``, at the end, when stopping early — and at every new best when
    final/ keeps the best weights (so the best is always a checkpoint)."""
    plan, step = run.plan, run.state.step
    due = step % plan.save_steps == 0 or step >= plan.total_steps or stopping
    if due or (improved and plan.keep == "best"):
        save_checkpoint(run, eval_loss)


def save_checkpoint(run: Run, eval_loss: float | None) -> None:
    """Rank 0 writes it (every rank holds the same weights and optimizer state) — except under
    FSDP, where every rank writes its shards into the folder rank 0 prepares
    (checkpoint/sharded.py) and rank 0 completes it."""
    world, sharded = run.plan.world, run.plan.sharded
    if not world.main:
        if sharded:
            save_sharded(Path(world.share(None)), run.model, run.optimizer)
        return

    def write(folder):
        if sharded:
            world.share(str(folder))  # where the other ranks write their shards
            save_sharded(folder, run.model, run.optimizer)
        else:
            run.plan.method.save(run.model, folder / TRAINED_FOLDER)
        save_state(folder, optimizer=None if sharded else run.optimizer, scheduler=None,
                   trainer_state=run.state.to_dict(), scaler=run.scaler)  # fmt: skip

    run.checkpoints.save(run.state.step, write, metric=eval_loss)


def validation_loss(run: Run) -> float | None:
    """Loss per reply token on the validation set (prompt tokens excluded)."""
    if not run.plan.val:
        return None
    try:
        return _validation_loss(run)
    except Exception as e:
        if is_oom(e):
            raise TrainingStopped(
                out_of_memory_message(run.plan.cfg, run.plan.method, "evaluation")
            ) from None
        raise


def _validation_loss(run: Run) -> float | None:
    plan = run.plan
    size = plan.cfg.train.eval_batch_size or plan.cfg.train.micro_batch_size
    pad, device = pad_id(plan.tokenizer), plan.placement.device
    total = weight = 0.0
    starts = list(range(0, len(plan.val), size))
    mine = [(i, True) for i in plan.world.part(starts)]  # this rank's batches
    if plan.sharded:  # as many passes as rank 0 (each gathers every layer); the extra ones idle
        mine += [(0, False)] * (-(-len(starts) // plan.world.size) - len(mine))
    run.model.eval()
    with torch.no_grad(), run.uncompiled():
        for i, counts in mine:
            batch = plan.objective.collate(plan.val[i : i + size], pad).to(device)
            with run.autocast():
                loss_sum = plan.objective.loss_sum(run.model, batch)
            if not counts:
                continue
            total += loss_sum.double().cpu().numpy() if loss_sum.ndim else float(loss_sum)
            weight += plan.objective.weight(batch)
    run.model.train()
    if plan.world.several:  # every rank's sums (a rank without a batch has plain zeros)
        parts = plan.world.gather((total, weight))
        total, weight = sum(t for t, _ in parts), sum(w for _, w in parts)
    if not np.all(np.asarray(weight) > 0):
        return None
    return float(np.sum(total / weight))
