"""The training loop, written out: no Trainer, no callbacks.

    for each optimizer step:
        plan its micro-batches; W = their total loss weight
        for each micro-batch: (loss_sum / W).backward()
        guard (NaN/Inf), clip, step, schedule
        log; maybe evaluate, checkpoint, stop early

Everything it needs is set up by :mod:`tunelab.train.setup` and passed in a :class:`Session`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.checkpoint.manager import CheckpointManager
from tunelab.checkpoint.state import load_state, save_state
from tunelab.config.schema import Config
from tunelab.data.collate import Batch, collate
from tunelab.data.tokenize import TokenizedExample
from tunelab.models.adapters import load_trained_into, save_trained, unfreeze_schedule
from tunelab.train.batches import StepPlan
from tunelab.train.guards import TrainingStopped, finite, is_oom, out_of_memory_message
from tunelab.train.loss import Objective, accumulate
from tunelab.train.report import MetricsLog

#: Test hook: ``TUNELAB_KILL_AT_STEP=k`` sends SIGKILL to this process right after step k.
_KILL_AT = int(os.environ.get("TUNELAB_KILL_AT_STEP", "0")) or None


class Interrupted(Exception):
    """Raised by ``Session.halt_at``: the run stops like a crash would, after a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"halted after step {step}")
        self.step = step


@dataclass
class Session:
    """A prepared run: model, data, optimizer, schedule and where to write."""

    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    objective: Objective
    train_set: list[TokenizedExample]
    val_set: list[TokenizedExample]  # weights: 1 on reply tokens, 0 elsewhere
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: StepPlan
    total_steps: int
    eval_steps: int
    save_steps: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    fingerprint: dict
    progress: object = None  # a callable(step, total, metrics) or None
    halt_at: int | None = None  # stop (as if interrupted) after this step's checkpoint; for tests
    state: dict = field(default_factory=dict)


@dataclass
class Outcome:
    steps: int
    train_loss: float | None
    initial_eval_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    nan_skips: int
    stopped_early: bool
    seconds: float
    tokens: int


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _autocast(s: Session):
    if s.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.autocast_dtype)


def evaluate(s: Session) -> float | None:
    """Loss per reply token on the validation set (prompt tokens excluded)."""
    if not s.val_set:
        return None
    try:
        return _evaluate(s)
    except Exception as e:
        if is_oom(e):
            raise TrainingStopped(out_of_memory_message(s.cfg, "evaluation")) from None
        raise


def _evaluate(s: Session) -> float | None:
    s.model.eval()
    total = weight = 0.0
    size = s.cfg.train.eval_batch_size or s.cfg.train.micro_batch_size
    with torch.no_grad():
        for i in range(0, len(s.val_set), size):
            batch = collate([t.seq for t in s.val_set[i : i + size]], _pad_id(s.tokenizer)).to(
                s.device
            )
            with _autocast(s):
                total += float(s.objective.loss_sum(s.model, batch))
            weight += s.objective.weight(batch)
    s.model.train()
    return total / weight if weight else None


def resume_from(s: Session, checkpoint: Path) -> None:
    load_trained_into(s.model, s.cfg.method, checkpoint / "trained")
    s.state = load_state(checkpoint, optimizer=s.optimizer, scheduler=s.scheduler, scaler=s.scaler)


def _save_checkpoint(
    s: Session, manager: CheckpointManager, step: int, metric: float | None
) -> None:
    def write(folder: Path) -> None:
        save_trained(s.model, s.cfg.method, folder / "trained")
        save_state(
            folder,
            optimizer=s.optimizer,
            scheduler=s.scheduler,
            trainer_state=s.state,
            scaler=s.scaler,
        )

    manager.save(step, write, metric=metric)


def train_loop(s: Session, metrics: MetricsLog, manager: CheckpointManager) -> Outcome:
    t = s.cfg.train
    st = s.state
    st.setdefault("step", 0)
    st.setdefault("nan_skips", 0)
    st.setdefault("best_eval_loss", None)
    st.setdefault("best_step", None)
    st.setdefault("evals_without_improvement", 0)
    st.setdefault("tokens", 0)
    st["fingerprint"] = s.fingerprint
    pad = _pad_id(s.tokenizer)
    started = time.perf_counter()
    last_loss = None
    stopped_early = False
    s.model.train()
    if s.cfg.method.name == "freeze" and s.cfg.method.unfreeze_every:
        unfreeze_schedule(s.model, s.cfg.method, st["step"])
    if t.eval_at_start and s.val_set and st["step"] == 0:
        before = evaluate(s)  # the untrained model: where the curve starts
        st["initial_eval_loss"] = before
        record = {"step": 0, "eval_loss": before, "eval_ppl": _ppl(before)}
        metrics.append(record)
        if s.progress:
            s.progress(0, s.total_steps, record)

    while st["step"] < s.total_steps:
        step = st["step"]
        epoch, micro = s.plan.step(step)
        if s.cfg.method.name == "freeze" and s.cfg.method.unfreeze_every:
            unfreeze_schedule(s.model, s.cfg.method, step)
        t0 = time.perf_counter()
        batches: list[Batch] = [
            collate([s.train_set[i].seq for i in mb], pad).to(s.device) for mb in micro
        ]
        try:
            loss_total = accumulate(s.model, s.objective, batches, lambda: _autocast(s), s.scaler)
        except Exception as e:
            if is_oom(e):
                raise TrainingStopped(out_of_memory_message(s.cfg, f"step {step + 1}")) from None
            raise
        if s.scaler:
            s.scaler.unscale_(s.optimizer)
        params = [p for g in s.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        lr = s.optimizer.param_groups[0]["lr"]
        ok = finite(loss_total, grad_norm)
        if ok:
            if s.scaler:
                s.scaler.step(s.optimizer)
                s.scaler.update()
            else:
                s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        st["step"] = step + 1
        tokens = sum(b.num_tokens for b in batches)
        st["tokens"] += tokens
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {
            "step": step + 1, "order": zlib.crc32(repr(micro).encode()), "epoch": round(epoch + (step % s.plan.steps_per_epoch + 1) / s.plan.steps_per_epoch, 4),
            "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
            "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None,
        }  # fmt: skip
        if not ok:
            st["nan_skips"] += 1
            record["nan_skipped"] = True
            metrics.append(record)
            if t.nan_action == "stop":
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {step + 1} (loss {loss_total}, grad norm {grad_norm}); "
                    f"train.nan_action=stop. The last checkpoint is intact; try a lower train.lr (now {t.lr})."
                )
            if st["nan_skips"] > t.max_nan_skips:
                raise TrainingStopped(
                    f"{st['nan_skips']} steps had a non-finite loss or gradient (more than train.max_nan_skips="
                    f"{t.max_nan_skips}); the learning rate (train.lr={t.lr}) is probably too high."
                )
        else:
            last_loss = loss_total
            metrics.append(record)
        if s.progress:
            s.progress(st["step"], s.total_steps, record)

        done = st["step"] >= s.total_steps
        metric = None
        if s.val_set and (st["step"] % s.eval_steps == 0 or done):
            metric = evaluate(s)
            improved = metric is not None and (
                st["best_eval_loss"] is None or metric < st["best_eval_loss"]
            )
            if improved:
                st["best_eval_loss"], st["best_step"] = metric, st["step"]
                st["evals_without_improvement"] = 0
            else:
                st["evals_without_improvement"] += 1
            eval_record = {"step": st["step"], "eval_loss": metric, "eval_ppl": _ppl(metric)}
            metrics.append(eval_record)
            if s.progress:
                s.progress(st["step"], s.total_steps, eval_record)
            patience = t.early_stopping_patience
            if patience and st["evals_without_improvement"] >= patience and not done:
                stopped_early = True
        if st["step"] % s.save_steps == 0 or done or stopped_early:
            _save_checkpoint(s, manager, st["step"], metric)
        if stopped_early:
            break
        if st["step"] == _KILL_AT:  # fault injection for the killed-process test
            os.kill(os.getpid(), signal.SIGKILL)
        if st["step"] == s.halt_at:
            raise Interrupted(st["step"])

    return Outcome(
        steps=st["step"], train_loss=last_loss, initial_eval_loss=st.get("initial_eval_loss"),
        best_eval_loss=st["best_eval_loss"], best_step=st["best_step"],
        nan_skips=st["nan_skips"], stopped_early=stopped_early, seconds=time.perf_counter() - started,
        tokens=st["tokens"],
    )  # fmt: skip


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")
