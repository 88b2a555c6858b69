"""``tunelab lr-find``: a learning-rate range test (Smith 2017, as fastai runs it).

A short run on the plan's own batches raises the learning rate geometrically from ``start`` to
``end`` over at most ``steps`` optimizer steps, records the loss, smooths it (EMA, β = 0.98,
bias-corrected) and stops once the smoothed loss exceeds ``DIVERGE`` × its minimum (or is not
finite). Nothing is saved: the weights on disk and the run folder are untouched; the result
(``lr_find.json``) and its plot (``lr_find.png``) go to their own folder.

The proposal, in the practitioner's words "as high as the curve stays stable":

* ``proposed``: the rate one decade below the minimum of the smoothed loss (``min / 10``):
  there the loss still falls steadily; at the minimum it is already about to turn;
* ``steepest``: where the smoothed loss falls fastest against log(lr), reported beside it;
* ``safe``: ``proposed / 3``, for a first run that must not go wrong.

A curve that never falls (too few steps, a start already too high) gives no proposal and says
so.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.files import atomic_write_bytes, atomic_write_json
from tunelab.train.report import ema

if TYPE_CHECKING:  # the sweep imports torch when it runs: `tunelab plan` reads results only
    import torch

    from tunelab.train.plan import RunPlan

DIVERGE = 4.0  # stop once the smoothed loss is this many times its minimum
BETA = 0.98  # EMA of the loss (fastai's)
MIN_POINTS = 10  # fewer recorded steps: no proposal


@dataclass
class LrFind:
    lrs: list[float]
    losses: list[float]  # raw, one per step
    smoothed: list[float]
    stopped: str  # why it stopped
    proposed: float | None
    steepest: float | None
    safe: float | None
    reason: str  # the proposal in words
    setup: dict = field(default_factory=dict)  # what was tested (see lr_find_setup)


def lr_find_setup(cfg) -> dict:
    """The settings a learning-rate proposal holds for (``tunelab plan`` uses a saved result
    only when they match its config)."""
    return {"model": cfg.model.name, "data": cfg.data.path, "objective": cfg.train.objective,
            "method": cfg.method.model_dump(mode="json"),
            "global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum}  # fmt: skip


def rates(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (k / max(1, steps - 1)) for k in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    return ema(losses, beta)


def propose(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None, str]:
    """(proposed, steepest, the reason in words) from a recorded curve."""
    if len(smoothed) < MIN_POINTS:
        return None, None, f"only {len(smoothed)} steps recorded: too few to propose a rate"
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    if low == 0 or smoothed[low] > smoothed[0] * 0.98:
        return None, None, (f"the loss never fell below its start ({smoothed[0]:.4g}): start "
                            "lower (--start) or check the data")  # fmt: skip
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1])
              for i in range(1, low)]  # fmt: skip
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else None
    proposed = lrs[low] / 10
    return (
        proposed,
        steepest,
        (
            f"the smoothed loss was lowest ({smoothed[low]:.4g}) at lr {lrs[low]:.2g}; one decade "
            f"below, {proposed:.2g}, it still falls steadily"
        ),
    )


def lr_find(plan: RunPlan, model: torch.nn.Module, *, start: float = 1e-7, end: float = 1e-1,
            steps: int = 100, autocast=None, progress=None) -> LrFind:  # fmt: skip
    """Run the range test on ``model`` (the method already applied); its weights change.
    ``progress(step, steps, lr, loss)`` is called after every step."""

    from tunelab.models.tokenizer import pad_id
    from tunelab.train.loop import accumulate
    from tunelab.train.optim import build_optimizer

    autocast = autocast or contextlib.nullcontext
    optimizer = build_optimizer(plan.method.optimizer_parameters(model), plan.cfg.train,
                                plan.placement.device.type)  # fmt: skip
    pad, device = pad_id(plan.tokenizer), plan.placement.device
    model.train()
    lrs, losses, stopped = [], [], f"reached lr {end:g} ({steps} steps)"
    avg, lowest = 0.0, math.inf
    for k, lr in enumerate(rates(start, end, steps)):
        _, micro = plan.steps.step(k)
        batches = [
            plan.objective.collate([plan.train[i] for i in mb], pad).to(device) for mb in micro
        ]
        loss = accumulate(model, plan.objective, batches, autocast)
        plan.objective.pop_stats()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss):
            stopped = f"the loss was not finite at lr {lr:.2g}"
            break
        lrs.append(lr)
        losses.append(loss)
        if progress:
            progress(k + 1, steps, lr, loss)
        avg = BETA * avg + (1 - BETA) * loss  # the EMA of smooth(), one step at a time
        now = avg / (1 - BETA ** len(losses))
        lowest = min(lowest, now)
        if len(losses) > 1 and now > DIVERGE * lowest:
            stopped = (
                f"the loss diverged at lr {lr:.2g} (smoothed {now:.4g} > {DIVERGE:g} x its minimum)"
            )
            break
    smoothed = smooth(losses)
    proposed, steepest, reason = propose(lrs, smoothed)
    safe = proposed / 3 if proposed else None
    return LrFind(lrs, losses, smoothed, stopped, proposed, steepest, safe, reason)


def write_lr_find(result: LrFind, out_dir: Path) -> tuple[Path, Path]:
    """``lr_find.json`` and ``lr_find.png`` in ``out_dir`` (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "lr_find.json", asdict(result))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed")
    for lr, label, color in ((result.proposed, "proposed", "tab:green"), (result.safe, "safe", "tab:olive"),
                             (result.steepest, "steepest", "tab:red")):  # fmt: skip
        if lr:
            ax.axvline(lr, color=color, linestyle="--", label=f"{label} {lr:.2g}")
    if result.smoothed:  # the diverging tail would flatten the part that matters
        low = min(min(result.losses), min(result.smoothed))
        ax.set_ylim(low - 0.05 * abs(low), max(result.smoothed[0] * 1.5, low + 1e-3))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out_dir / "lr_find.png", buf.getvalue())
    return out_dir / "lr_find.json", out_dir / "lr_find.png"
