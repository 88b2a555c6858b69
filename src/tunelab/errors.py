"""Typed user errors.

Every mistake a user can make with their input (a data file, a config, a model path) raises a
subclass of :class:`TunelabError`. The CLI prints its message without a traceback and exits
with :attr:`TunelabError.exit_code` (2). Anything else is a bug in tunelab and keeps its
traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class TunelabError(Exception):
    """A problem with the user's input, reported without a traceback."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one place in a file: ``file:line: field: message``."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class DataError(TunelabError):
    """One or more records (or a whole data file) are unusable.

    ``problems`` keeps every problem found (the message shows the first ``cap``)."""

    def __init__(
        self, problems: list[Problem] | Problem, *, total: int | None = None, cap: int = 20
    ):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.total = total if total is not None else len(self.problems)
        lines = [str(p) for p in self.problems[:cap]]
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more problem(s)")
        super().__init__("\n".join(lines))


class ConfigError(TunelabError):
    """A configuration key is unknown or its value is impossible."""


class ModelError(TunelabError):
    """A model or tokenizer could not be found or read."""
