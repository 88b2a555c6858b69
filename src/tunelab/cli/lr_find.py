"""``tunelab lr-find``: the learning-rate range test for a run config."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunelab.cli.progress import progress_bar


def lr_find(
    config: Path | None = typer.Argument(None, help="A YAML config, as for tunelab train."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides."),
    start: float = typer.Option(1e-7, "--start", help="First learning rate."),
    end: float = typer.Option(1e-1, "--end", help="Last learning rate (if it gets that far)."),
    steps: int = typer.Option(100, "--steps", min=10, max=1000, help="Most steps to run."),
    out: Path = typer.Option(Path("runs/lr-find"), "--out", help="Where lr_find.json/.png go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Learning-rate range test: raise the lr geometrically, watch the loss, propose a rate."""
    from tunelab.config.load import load_config
    from tunelab.workflow.lr_find import find_lr

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    cfg = load_config(config, overrides or [])
    console = Console(stderr=True, highlight=False)
    bar = progress_bar(TextColumn("lr-find step {task.completed}/{task.total}"), BarColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=console, quiet=quiet)  # fmt: skip
    task = bar.add_task("lr-find", total=steps, info="")

    def on_step(step: int, total: int, lr: float, loss: float) -> None:
        bar.update(task, completed=step, info=f"lr {lr:.2e} loss {loss:.4f}")

    with bar:
        result = find_lr(cfg, out, start=start, end=end, steps=steps, progress=on_step)
    print(
        f"{len(result.lrs)} steps, lr {result.lrs[0]:.2g} -> {result.lrs[-1]:.2g}: {result.stopped}"
    )
    if result.proposed is None:
        print(f"no proposal: {result.reason}")
    else:
        steepest = f"; steepest descent at {result.steepest:.2g}" if result.steepest else ""
        print(f"proposed train.lr={result.proposed:.2g} (safe: {result.safe:.2g}{steepest}): "
              f"{result.reason}")  # fmt: skip
    print(f"written: {out / 'lr_find.json'}, {out / 'lr_find.png'}")
