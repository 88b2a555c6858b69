"""``tunelab doctor``: read a run's loss curve and say what is wrong and what to change.

Pure functions from the records of ``metrics.jsonl`` (and, optionally, ``result.json``) to a
list of :class:`Finding` s; :func:`write_doctor` adds ``doctor.md`` and ``doctor.png`` to the
run folder. Every rule reads the *smoothed* training loss (an EMA, bias-corrected at the start)
or a least-squares trend with its t-statistic, and relative changes, never single raw points.

Thresholds, and why:

- ``MIN_STEPS = 8``: fewer finite training steps are too few for a trend; the one finding is
  ``too_short`` (NaN-skipped steps are still reported: they need no trend).
- EMA window ``clamp(n / 8, 3, 50)`` steps: long enough to average batch-to-batch noise
  (a window of w cuts iid noise by about sqrt(w)), short enough to follow a 40-step run.
- ``lr_too_high`` fires on any of:
  ``NaN-skipped`` steps (any: a finite model does not produce them at a sane learning rate);
  divergence, the smoothed loss at the end ``DIVERGE = 25 %`` above its minimum *and* the last
  eighth rising, or its peak ``DIVERGE`` above the start (the untrained model's loss: training
  never makes it worse by that much; noise smoothed over a window stays within a few %, and a
  bump of one batch does not move an EMA by 25 %);
  ``SPIKE_COUNT = 2`` spikes, a raw loss above ``SPIKE_RATIO = 2.5`` x the median of its
  neighbours (+-5 steps) and at least ``SPIKE_NATS = 0.5`` above it (the floor keeps a
  memorised 0.01 -> 0.05 blip quiet; one spike can be an odd batch, two are a pattern);
  ``SPIKE_COUNT`` grad-norm explosions, a grad norm above ``GRAD_RATIO = 10`` x the median of
  the 20 steps before it, after the first 10 % of steps (early gradients are large anyway).
- "clearly falling" (trend over the last quarter of the training steps, >= 4 points): the
  least-squares slope has ``t < -TREND_T`` (``TREND_T = 3``: pure noise passes it about 0.3 %
  of the time) and the fitted decline over that quarter is at least ``TAIL_DROP = 3 %``.
- ``lr_too_low``: the loss fell by less than ``LOW_TOTAL = 20 %`` of its start in the whole run
  and either still falls clearly and linearly (the last quarter holds at least
  ``LINEAR_SHARE = 15 %`` of the total decline; a straight line has 25 %, a converged
  exponential about 0), or hardly moved at all (``|decline| < FLAT = 3 %`` with no clear trend,
  the validation loss too if evaluated, and the loss not already near zero).
- ``not_converged``: the training loss is clearly falling at the end and, with two or more
  evaluations after step 0, the last validation loss is the best one and ``EVAL_FALL = 1 %``
  below the one before. Not reported together with ``lr_too_low`` (same cure, more of it).
- ``overfitting``: after the best evaluation at least ``OVERFIT_EVALS = 2`` evaluations, the
  last two both ``OVERFIT_MARGIN = 2 %`` above the best (one noisy uptick stays quiet), while the
  smoothed training loss at the last evaluation is lower than at the best one.
- ``memorisation``: the smoothed training loss below ``MEMO_LOSS = 0.05`` (perplexity < 1.05)
  within the first third of the steps: the model recites the training set.
- ``healthy``: none of the above: the end is flat, or only the training loss still falls while
  the validation loss has stopped improving (more steps would not help). Never an empty list.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

from tunelab.errors import TunelabError
from tunelab.files import atomic_write_bytes, atomic_write_text
from tunelab.train.report import MetricsLog, ema, window_beta

MIN_STEPS = 8
DIVERGE = 0.25
SPIKE_RATIO, SPIKE_NATS, SPIKE_COUNT = 2.5, 0.5, 2
GRAD_RATIO = 10.0
TREND_T, TAIL_DROP = 3.0, 0.03
LOW_TOTAL, LINEAR_SHARE, FLAT = 0.20, 0.15, 0.03
EVAL_FALL = 0.01
OVERFIT_EVALS, OVERFIT_MARGIN = 2, 0.02
MEMO_LOSS = 0.05

KINDS = ("lr_too_high", "lr_too_low", "not_converged", "overfitting", "memorisation", "healthy",
         "too_short")  # fmt: skip


class DoctorError(TunelabError):
    """A folder that is not a run folder with training records."""


@dataclass(frozen=True)
class Finding:
    """One diagnosis: what (``kind``), on what grounds (``evidence``), what to change."""

    kind: str
    evidence: str
    advice: str
    steps: tuple[int, ...] = field(default=())  # the steps the evidence names (for the plot)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": list(self.steps)}


@dataclass
class Curve:
    """The numbers every rule reads, taken once from the records."""

    steps: list[int]
    loss: list[float]
    smooth: list[float]
    evals: list[tuple[int, float]]
    nan_steps: list[int]
    grads: list[tuple[int, float]]
    epochs: dict[int, float]
    lr: float | None
    total_epochs: float | None


# ---- the curve ---------------------------------------------------------------------------


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def curve(records: list[dict], info: dict | None = None) -> Curve:
    train = [r for r in records if "loss" in r and _finite(r.get("step"))]
    ok = [r for r in train if not r.get("nan_skipped") and _finite(r["loss"])]
    loss = [float(r["loss"]) for r in ok]
    window = min(50, max(3, len(loss) // 8))
    evals = sorted((r["step"], float(r["eval_loss"])) for r in records
                   if _finite(r.get("eval_loss")) and _finite(r.get("step")))  # fmt: skip
    settings = (info or {}).get("train") or {}
    lrs = [r["lr"] for r in train if _finite(r.get("lr"))]
    epochs = {r["step"]: r["epoch"] for r in train if _finite(r.get("epoch"))}
    return Curve(
        steps=[r["step"] for r in ok], loss=loss, smooth=ema(loss, window_beta(window)), evals=evals,
        nan_steps=[r["step"] for r in train if r.get("nan_skipped") or not _finite(r["loss"])],
        grads=[(r["step"], r["grad_norm"]) for r in ok if _finite(r.get("grad_norm"))],
        epochs=epochs, lr=settings.get("lr") or (max(lrs) if lrs else None),
        total_epochs=max(epochs.values()) if epochs else settings.get("epochs"),
    )  # fmt: skip


def trend(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares: (relative decline of the fitted line over ``xs``, t-statistic of the
    slope). A positive decline is a falling loss; t < 0 is a falling trend."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 3 or sxx == 0 or my == 0:
        return 0.0, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx)
    t = slope / se if se > 0 else (-math.inf if slope < 0 else math.inf if slope > 0 else 0.0)
    return -slope * (xs[-1] - xs[0]) / abs(my), t


def _tail(c: Curve) -> tuple[float, float]:
    k = max(4, len(c.loss) // 4)
    return trend([float(s) for s in c.steps[-k:]], c.loss[-k:])


def _falling(c: Curve) -> bool:
    drop, t = _tail(c)
    return t < -TREND_T and drop >= TAIL_DROP


def _start(c: Curve) -> float:
    """The loss at the start: the median of the first 3 steps (robust to one odd batch)."""
    return median(c.loss[:3])


def _lr(c: Curve) -> str:
    return f" (now {c.lr:g})" if c.lr is not None else ""


# ---- the rules ---------------------------------------------------------------------------


def _spikes(c: Curve) -> list[int]:
    found = []
    for i, value in enumerate(c.loss):
        around = c.loss[max(0, i - 5) : i] + c.loss[i + 1 : i + 6]
        mid = median(around) if around else value
        if value > SPIKE_RATIO * mid and value - mid > SPIKE_NATS:
            found.append(c.steps[i])
    return found


def _explosions(c: Curve) -> list[int]:
    found, start = [], max(1, len(c.grads) // 10)
    for i in range(start, len(c.grads)):
        before = [g for _, g in c.grads[max(0, i - 20) : i]]
        if before and c.grads[i][1] > GRAD_RATIO * max(median(before), 1e-12):
            found.append(c.grads[i][0])
    return found


def lr_too_high(c: Curve) -> Finding | None:
    parts, steps = [], []
    if c.nan_steps:
        parts.append(f"{len(c.nan_steps)} step(s) had a non-finite loss or gradient and were "
                     f"skipped (first at step {c.nan_steps[0]})")  # fmt: skip
        steps.append(c.nan_steps[0])
    if len(c.smooth) >= MIN_STEPS:
        low = min(range(len(c.smooth)), key=c.smooth.__getitem__)
        k = max(2, len(c.smooth) // 8)
        rising = c.smooth[-1] > c.smooth[-1 - k]
        peak = max(range(len(c.smooth)), key=c.smooth.__getitem__)
        if c.smooth[-1] > c.smooth[low] * (1 + DIVERGE) and rising:
            parts.append(f"the smoothed loss rose from its minimum {c.smooth[low]:.4g} at step "
                         f"{c.steps[low]} to {c.smooth[-1]:.4g} at step {c.steps[-1]}: diverging")  # fmt: skip
            steps.append(c.steps[low])
        elif c.smooth[peak] > _start(c) * (1 + DIVERGE):
            parts.append(f"the smoothed loss blew up from {_start(c):.4g} at the start to "
                         f"{c.smooth[peak]:.4g} at step {c.steps[peak]}")  # fmt: skip
            steps.append(c.steps[peak])
    spikes = _spikes(c) if len(c.loss) >= MIN_STEPS else []
    if len(spikes) >= SPIKE_COUNT:
        parts.append(f"{len(spikes)} loss spikes above {SPIKE_RATIO:g}x the local median "
                     f"(steps {_list(spikes)})")  # fmt: skip
        steps += spikes[:3]
    bursts = _explosions(c) if len(c.grads) >= MIN_STEPS else []
    if len(bursts) >= SPIKE_COUNT:
        parts.append(f"{len(bursts)} gradient-norm explosions above {GRAD_RATIO:g}x the recent "
                     f"median (steps {_list(bursts)})")  # fmt: skip
        steps += bursts[:3]
    if not parts:
        return None
    return Finding("lr_too_high", "; ".join(parts) + ".",
                   f"lower train.lr by 3-10x{_lr(c)}", tuple(sorted(set(steps))))  # fmt: skip


def lr_too_low(c: Curve) -> Finding | None:
    start, end = _start(c), c.smooth[-1]
    total = (start - end) / start if start else 0.0
    drop, t = _tail(c)
    if c.smooth and min(c.smooth) < MEMO_LOSS:
        return None
    if 0 < total < LOW_TOTAL and t < -TREND_T and drop >= LINEAR_SHARE * total:
        why = (f"the smoothed loss fell only {total:.1%} in {c.steps[-1]} steps ({start:.4g} -> "
               f"{end:.4g}), and steadily: {drop:.1%} in the last quarter alone")  # fmt: skip
    elif abs(total) < FLAT and t >= -TREND_T and _eval_flat(c):
        why = (f"the loss hardly moved in {c.steps[-1]} steps ({start:.4g} -> {end:.4g}, "
               f"{total:+.1%})" + _eval_words(c))  # fmt: skip
    else:
        return None
    return Finding("lr_too_low", why + ".", f"raise train.lr about 3x{_lr(c)}",
                   (c.steps[0], c.steps[-1]))  # fmt: skip


def _eval_flat(c: Curve) -> bool:
    if len(c.evals) < 2:
        return True
    first, best = c.evals[0][1], min(v for _, v in c.evals)
    return (first - best) / first < FLAT if first else True


def _eval_words(c: Curve) -> str:
    if len(c.evals) < 2:
        return ""
    return f"; validation loss {c.evals[0][1]:.4g} -> {c.evals[-1][1]:.4g}"


def not_converged(c: Curve) -> Finding | None:
    if not _falling(c):
        return None
    drop, _ = _tail(c)
    words = (f"the training loss still falls at the end: {drop:.1%} over the last quarter "
             f"(to {c.smooth[-1]:.4g} at step {c.steps[-1]})")  # fmt: skip
    later = [e for e in c.evals if e[0] > 0]
    if len(later) >= 2:
        (s1, v1), (s2, v2) = later[-2], later[-1]
        if not (v2 <= min(v for _, v in c.evals) and v2 < v1 * (1 - EVAL_FALL)):
            return None
        words += (
            f", and so does the validation loss ({v1:.4g} at step {s1} -> {v2:.4g} at step {s2})"
        )
    return Finding("not_converged", words + ".", "train more epochs or add data", (c.steps[-1],))


def overfitting(c: Curve) -> Finding | None:
    if not c.evals:
        return None
    b = min(range(len(c.evals)), key=lambda i: c.evals[i][1])
    best_step, best = c.evals[b]
    after = c.evals[b + 1 :]
    if len(after) < OVERFIT_EVALS or any(v <= best * (1 + OVERFIT_MARGIN) for _, v in after[-2:]):
        return None
    at_best, at_last = _smooth_at(c, best_step), _smooth_at(c, after[-1][0])
    at_best = _start(c) if at_best is None else at_best  # best at step 0: the untrained model
    if at_last is not None and at_last >= at_best:
        return None
    epochs = c.epochs.get(best_step)
    fewer = f" (about {max(1, math.ceil(epochs))})" if epochs else ""
    return Finding(
        "overfitting",
        f"the validation loss was best at step {best_step} ({best:.4g}) and rose over the "
        f"{len(after)} evaluations after it, to {after[-1][1]:.4g} at step {after[-1][0]}, "
        f"while the training loss kept falling.",
        f"the best step is {best_step} (validation loss {best:.4g}): keep it (train.keep=best, the "
        f"default), and train fewer epochs{fewer} or add data / weight decay / LoRA dropout",
        (best_step, after[-1][0]),
    )  # fmt: skip


def _smooth_at(c: Curve, step: int) -> float | None:
    """The smoothed training loss at the last logged step <= ``step`` (None before any)."""
    values = [v for s, v in zip(c.steps, c.smooth, strict=True) if s <= step]
    return values[-1] if values else None


def memorisation(c: Curve) -> Finding | None:
    third = c.steps[0] + (c.steps[-1] - c.steps[0]) / 3
    hit = next((i for i, v in enumerate(c.smooth) if v < MEMO_LOSS and c.steps[i] <= third), None)
    if hit is None:
        return None
    epochs = f" (now {c.total_epochs:g})" if c.total_epochs else ""
    return Finding(
        "memorisation",
        f"the smoothed training loss was {c.smooth[hit]:.4f} (perplexity "
        f"{math.exp(c.smooth[hit]):.3f}) already at step {c.steps[hit]} of {c.steps[-1]}: the model "
        f"recites its training examples.",
        f"cut epochs to about a third{epochs}, or add data",
        (c.steps[hit],),
    )  # fmt: skip


def healthy(c: Curve) -> Finding:
    drop, t = _tail(c)
    if _falling(c):  # not_converged stayed quiet: the validation loss has stopped improving
        return Finding(
            "healthy",
            f"the training loss still falls ({drop:.1%} over the last quarter) but the validation "
            f"loss stopped improving (best {min(v for _, v in c.evals):.4g}, last "
            f"{c.evals[-1][1]:.4g} at step {c.evals[-1][0]}): more steps would not help.",
            "nothing to change",
        )  # fmt: skip
    return Finding(
        "healthy",
        f"the smoothed loss went {_start(c):.4g} -> {c.smooth[-1]:.4g} in {c.steps[-1]} steps and "
        f"is flat at the end ({-drop:+.1%} over the last quarter, trend t={t:.1f}); nothing diverged.",
        "nothing to change",
    )  # fmt: skip


def _list(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:5])
    return shown + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")


def diagnose(records: list[dict], info: dict | None = None) -> list[Finding]:
    """Every finding for a run's records (``info``: its result.json, for lr and epochs)."""
    c = curve(records, info)
    high = lr_too_high(c)
    if len(c.loss) < MIN_STEPS:
        short = Finding("too_short", f"only {len(c.loss)} finite training step(s) logged; at least "
                        f"{MIN_STEPS} are needed to judge a trend.", "train longer to judge")  # fmt: skip
        return [high] if high else [short]
    low = lr_too_low(c)
    found = [high, low, None if low else not_converged(c), overfitting(c), memorisation(c)]
    found = [f for f in found if f is not None]
    return found or [healthy(c)]


# ---- the run folder ----------------------------------------------------------------------


#: What is worth saying while a run is still going (the rest needs the whole curve).
WATCHED = ("lr_too_high", "overfitting")


def watch(records: list[dict], said: set[str]) -> list[Finding]:
    """The findings of :data:`WATCHED` kinds in the curve so far that were not said before
    (``said`` is updated): for ``train.doctor`` during training."""
    c = curve(records)
    if not c.loss:
        return []
    found = [f for f in (lr_too_high(c), overfitting(c)) if f is not None and f.kind not in said]
    said.update(f.kind for f in found)
    return found


def read_run(run_dir: Path) -> tuple[list[dict], dict | None]:
    """The records and result.json of a run folder; :class:`DoctorError` when it has no
    training records."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DoctorError(f"{run_dir}: no such run folder")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DoctorError(f"{run_dir}: not a run folder (no metrics.jsonl)")
    records = MetricsLog.read(metrics)
    if not any("loss" in r for r in records):
        raise DoctorError(f"{run_dir}: metrics.jsonl has no training records yet")
    result = run_dir / "result.json"
    info = json.loads(result.read_text()) if result.is_file() else None
    return records, info


def doctor_markdown(findings: list[Finding], name: str) -> str:
    lines = [f"# Doctor: {name}", ""]
    for f in findings:
        lines += [
            f"## {f.kind}",
            "",
            f"- **Evidence:** {f.evidence}",
            f"- **Advice:** {f.advice}",
            "",
        ]
    return "\n".join(lines)


def write_doctor(run_dir: Path, records: list[dict], info: dict | None = None) -> list[Finding]:
    """Diagnose, and write ``doctor.md`` and ``doctor.png`` into ``run_dir``."""
    run_dir = Path(run_dir)
    findings = diagnose(records, info)
    plot_doctor(curve(records, info), findings, run_dir / "doctor.png")
    atomic_write_text(run_dir / "doctor.md", doctor_markdown(findings, run_dir.name))
    return findings


def plot_doctor(c: Curve, findings: list[Finding], out_png: Path) -> Path:
    """The loss curve (raw faint, smoothed, eval points) with each finding's steps marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if c.loss:
        ax.plot(c.steps, c.loss, color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(c.steps, c.smooth, color="tab:blue", label="train loss (smoothed)")
    if c.evals:
        ax.plot(
            *zip(*c.evals, strict=True), "o-", color="tab:orange", markersize=4, label="eval loss"
        )
    colors = ["tab:red", "tab:purple", "tab:brown", "tab:green", "tab:gray", "tab:olive"]
    for f, color in zip(findings, colors * 2, strict=False):
        for i, step in enumerate(f.steps):
            ax.axvline(
                step, color=color, linestyle="--", alpha=0.7, label=f.kind if i == 0 else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Doctor: " + ", ".join(f.kind for f in findings))
    ax.grid(alpha=0.3)
    if c.loss or c.evals:
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(out_png, buf.getvalue())
