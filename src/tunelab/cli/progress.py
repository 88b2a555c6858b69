"""The commands' progress bars: rich's, redrawn once a second.

rich redraws ten times a second by default, from a thread of its own that wakes beside the
work's threads. On a 2-core CPU that cost ``tunelab train`` of the example task ~11 % of its
steps' time (docs/speed.md, "Progress bars"); a bar of steps that last seconds loses nothing at
one redraw a second."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

#: how often a bar is redrawn (rich's default: 10)
REDRAWS_PER_SECOND = 1


def progress_bar(*columns: ProgressColumn | str, console: Console, quiet: bool,
                 transient: bool = False) -> Progress:  # fmt: skip
    """A bar of ``columns`` on ``console`` (none with ``quiet``)."""
    return Progress(*columns, console=console, disable=quiet, transient=transient,
                    refresh_per_second=REDRAWS_PER_SECOND)  # fmt: skip


def counting_bar(console: Console, quiet: bool) -> Progress:
    """A bar that counts items and goes when done: what, bar, done/total, time left."""
    return progress_bar(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=console, quiet=quiet, transient=True,
    )  # fmt: skip
