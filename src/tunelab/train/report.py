"""The run folder's human side: the metrics log, the loss plot and ``summary.md``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tunelab.files import atomic_write_bytes, read_jsonl
from tunelab.models.methods import summary_fields

# ---- metrics.jsonl -----------------------------------------------------------------------


class MetricsLog:
    """An append-only JSONL log, one record per line (``{"step": 10, "loss": 1.9, ...}``).

    Each record is written with one ``write`` and flushed, so a killed process loses at most
    the line it was writing. A record counts once its newline is in the file: a last line
    without one is torn, ignored by :meth:`read` and cut off before the next append."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Keep only records with ``step <= step`` (and those without a step); for resuming
        from the checkpoint of ``step``. The file is replaced atomically. Returns the number
        of records dropped."""
        self.close()
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for _, line, record in _records(self.path):
            if isinstance(record.get("step"), int | float) and record["step"] > step:
                dropped += 1
            else:
                kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))
        return dropped

    @staticmethod
    def read(path: Path) -> list[dict]:
        """Every complete record; [] when the file does not exist yet."""
        path = Path(path)
        return [record for _, _, record in _records(path)] if path.exists() else []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # cut a torn last line, so the next record starts on its own line
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        return open(self.path, "a", encoding="utf-8", buffering=1)


def _records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, line, record) for every complete non-blank line (a torn last line, one
    without its newline, is ignored)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    for lineno, record in read_jsonl(path, text, torn_tail=True):
        yield lineno, lines[lineno - 1], record


# ---- loss plot ---------------------------------------------------------------------------


#: Panels a preference run adds under the loss: (train key, eval key, label).
PREFERENCE_PANELS = (
    ("margin", "eval_margin", "reward margin\n(chosen - rejected)"),
    ("reward_accuracy", "eval_reward_accuracy", "reward accuracy"),
)


def _stage_starts(records: list[dict]) -> list[tuple[int, str]]:
    """(first step, name) of each stage the log names, in order."""
    starts, last = [], None
    for r in records:
        if "stage" in r and r["stage"] != last:
            starts.append((r["step"], r["stage"]))
            last = r["stage"]
    return starts


def plot_losses(records: list[dict], out_png: Path, *, title: str = "Training") -> Path:
    """Train loss per step (``loss``), eval loss (``eval_loss``) and, below, the learning rate
    (``lr``), against ``step``; a preference run adds its reward margin and reward accuracy
    panels (train and eval) between them. Linear axes; with more than 50 train points the raw
    curve is drawn faint under a smoothed one. Written atomically."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = _series(records, "loss")
    evals = _series(records, "eval_loss")
    lrs = _series(records, "lr")
    panels = [
        (label, _series(records, k), _series(records, ek)) for k, ek, label in PREFERENCE_PANELS
    ]
    panels = [p for p in panels if p[1] or p[2]]

    ratios = [3] + [1.5] * len(panels) + ([1] if lrs else [])
    fig = Figure(figsize=(8, 4.5 + 1.5 * len(panels) + (1 if lrs else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios, squeeze=False)[:, 0]
    ax, ax_lr = axes[0], (axes[-1] if lrs else None)

    _curves(ax, train, evals, "loss")
    if evals:
        best_step, best = min(evals, key=lambda p: p[1])
        ax.plot([best_step], [best], "*", color="tab:red", markersize=12, label=f"best {best:.4g}")
    if not train and not evals:
        ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if train or evals:
        ax.legend()
    for panel_ax, (label, points, eval_points) in zip(axes[1:], panels, strict=False):
        _curves(panel_ax, points, eval_points, label.split("\n")[0])
        panel_ax.set_ylabel(label)
        panel_ax.legend(fontsize="small")

    if ax_lr is not None:
        ax_lr.plot(*zip(*lrs, strict=True), color="tab:green")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax_lr.grid(alpha=0.3)
    for at, name in _stage_starts(records):  # a run in stages: where each one begins
        for each in axes:
            each.axvline(at - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.annotate(name, (at - 0.5, 1), xycoords=("data", "axes fraction"), fontsize="small",
                    ha="left", va="top", color="grey")  # fmt: skip
    axes[-1].set_xlabel("step")

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def _curves(ax, train: list, evals: list, what: str) -> None:
    """One panel's train curve (smoothed when long) and eval points."""
    if train:
        steps, values = zip(*train, strict=True)
        if len(train) > 50:
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values), color="tab:blue", label=f"train {what} (smoothed)")
        else:
            ax.plot(steps, values, color="tab:blue", label=f"train {what}")
    if evals:
        steps, values = zip(*evals, strict=True)
        ax.plot(steps, values, "o-", color="tab:orange", markersize=4, label=f"eval {what}")
    ax.grid(alpha=0.3)


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) for records that have both, skipping NaN/Inf (skipped steps)."""
    points = []
    for record in records:
        step, value = record.get("step"), record.get(key)
        numbers = isinstance(step, int | float) and isinstance(value, int | float)
        if numbers and math.isfinite(value):
            points.append((step, value))
    return points


def ema(values, beta: float) -> list[float]:
    """Exponential moving average, bias-corrected at the start (as TensorBoard and fastai do):
    the one smoothing of loss curves (the plot, tunelab doctor, lr-find)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def window_beta(window: int) -> float:
    """The EMA factor that averages over about ``window`` points."""
    return 1 - 2 / (window + 1)


def _smooth(values: tuple[float, ...]) -> list[float]:
    return ema(values, window_beta(min(100, max(5, len(values) // 20))))


# ---- summary.md --------------------------------------------------------------------------

# The training settings worth a glance (the rest is in config.yaml).
_TRAIN_FIELDS = ("lr", "epochs", "max_steps", "micro_batch_size", "grad_accum", "schedule",
                 "warmup_ratio", "warmup_steps", "weight_decay", "seed")  # fmt: skip


def write_summary(run_dir: Path, info: dict) -> Path:
    """Write ``run_dir/summary.md``, a short markdown of a run, from whatever ``info`` has.

    Keys (where two are given, either): name, model, parameters, device, method (a name or
    the method config dict), hyperparameters (dict), train (the train config dict),
    train_records | train_examples, val_records | val_examples, train_tokens | tokens, steps,
    epochs, stopped_early, elapsed_s | seconds, wall_seconds, tokens_per_s,
    peak_memory_bytes, peak_gpu_gib, peak_rss_gib, final_train_loss, best_eval_loss,
    best_step, nan_skips, output. Any other key is listed at the end as it is."""
    out = _Lines(info)
    out.lines += [f"# Run {out.pick('name') or Path(run_dir).name}", ""]
    _setup(out)
    _results(out)
    for key, value in info.items():
        if key not in out.used and value is not None:
            out.add(key, _settings(value) if isinstance(value, dict) else value)
    lines = out.lines
    path = Path(run_dir) / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


class _Lines:
    """The summary's lines, and which keys of ``info`` they used."""

    def __init__(self, info: dict):
        self.info, self.used, self.lines = info, set(), []

    def pick(self, *keys: str) -> Any:
        self.used.update(keys)
        return next((self.info[k] for k in keys if self.info.get(k) is not None), None)

    def add(self, label: str, *parts: Any) -> None:
        text = ", ".join(str(p) for p in parts if not _blank(p))
        if text:
            self.lines.append(f"- **{label}:** {text}")


def _setup(out: _Lines) -> None:
    pick, add, info = out.pick, out.add, out.info
    add("Model", pick("model"), _count(pick("parameters"), "parameters"), pick("device"))
    add("Processes", pick("world_size"), pick("distributed"))
    method, hyperparameters = _method(pick("method")), _settings(pick("hyperparameters"))
    add("Method", f"{method} ({hyperparameters})" if method and hyperparameters else method)
    if not method:
        add("Hyperparameters", hyperparameters)
    add("Objective", pick("objective"))
    add("Training settings", _settings(pick("train"), _TRAIN_FIELDS))
    add("Data", _count(pick("train_records", "train_examples"), "train records"),
        _count(pick("val_records", "val_examples"), "validation records"),
        _count(pick("train_tokens", "tokens"), "tokens"), pick("truncation"))  # fmt: skip
    out.used.update(("truncated", "dropped") if "truncation" in info else ())
    add("Replay", pick("replay"))
    resumed, ran = pick("resumed_from"), pick("steps_run")
    add("Progress", _count(pick("steps"), "steps"), _count(pick("epochs"), "epochs"),
        pick("stopped_early") and "stopped early",
        resumed is not None and f"resumed from step {resumed}, {ran} steps in the last process")  # fmt: skip
    add("Time", _duration(pick("elapsed_s", "seconds")),
        _duration(pick("wall_seconds")) and f"{_duration(info['wall_seconds'])} in all",
        _count(pick("tokens_per_s"), "tokens/s"))  # fmt: skip
    add("Peak memory", _gib(pick("peak_memory_bytes"), per_unit=1),
        _gib(pick("peak_gpu_gib")) and f"GPU {_gib(info['peak_gpu_gib'])}",
        _gib(pick("peak_rss_gib")) and f"process {_gib(info['peak_rss_gib'])}")  # fmt: skip


def _results(out: _Lines) -> None:
    pick, add, info = out.pick, out.add, out.info
    add("Final train loss", _loss(pick("final_train_loss")))
    nll = info.get("objective", "sft") == "sft"  # a preference loss has no perplexity

    def loss(value: float) -> str:
        from tunelab.models.nll import perplexity  # here: nll imports torch, `tunelab plan` none

        return f"{value:.4f} (perplexity {perplexity(value):.2f})" if nll else f"{value:.4f}"

    before = pick("initial_eval_loss")
    if _is_number(before):
        add("Eval loss before training", loss(before))
    best, step = pick("best_eval_loss"), pick("best_step")
    if _is_number(best):
        at = f" at step {step}" if step is not None else ""
        add("Best eval loss", f"{loss(best)}{at}")
    stats = pick("last_eval_stats") or {}
    if "reward_accuracy" in stats or "margin" in stats:
        shown = [f"{k.replace('_', ' ')} {stats[k]:.3f}" for k in ("reward_accuracy", "margin",
                 "chosen_reward", "rejected_reward", "kl") if _is_number(stats.get(k))]  # fmt: skip
        add("Last evaluation (preference)", ", ".join(shown))
    add("NaN/Inf steps skipped", pick("nan_skips"))
    out.used.update(("keep", "final_step"))  # said in words by "final"
    add("Final weights", pick("final"))
    add("Output", pick("output") and f"`{info['output']}`")


def _blank(value: Any) -> bool:
    """Nothing worth a line: None, False, "" or an empty list/dict (0 is worth one)."""
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _method(method: Any) -> str | None:
    if not isinstance(method, dict):
        return method
    name = method.get("name")
    settings = _settings(method, summary_fields(name))
    return f"{name} ({settings})" if settings else name


def _settings(values: Any, fields: tuple[str, ...] | None = None) -> str | None:
    """{"r": 16, "lr": 2e-4} -> "r=16, lr=0.0002" (only ``fields`` when given; no blanks)."""
    if not isinstance(values, dict):
        return None if values is None else str(values)
    keys = fields if fields is not None else tuple(values)
    return ", ".join(f"{k}={values[k]}" for k in keys if not _blank(values.get(k)))


def _count(value: Any, unit: str) -> str | None:
    if not _is_number(value):
        return None
    shown = f"{value:.3g}" if isinstance(value, float) and value < 100 else f"{value:,.0f}"
    return f"{shown} {unit}"


def _loss(value: Any) -> str | None:
    return f"{value:.4f}" if _is_number(value) else None


def _duration(seconds: Any) -> str | None:
    if not _is_number(seconds):
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _gib(value: Any, per_unit: int = 2**30) -> str | None:
    """A size in units of ``per_unit`` bytes (default: GiB already) -> "3.50 GiB"."""
    return f"{value * per_unit / 2**30:.2f} GiB" if _is_number(value) else None
