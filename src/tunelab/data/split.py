"""Deterministic train/val/test splits with no prompt leaking across splits.

Records are grouped by their normalised prompt (:func:`normalize`), so exact duplicates and
near-duplicate prompts (differing only in case, spacing, punctuation or digits) always land in
the same split. The groups, in order of first appearance, are shuffled with
``random.Random(seed)`` (the same on every machine) and poured into the splits in order; each
split keeps the original file order.

Splits are written as JSONL of the original row fields, all files at once: every file goes to
a temporary file in the same folder first and is renamed into place only when all were
written, so a failure leaves no half-written split behind.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path

from tunelab.data.read import Row
from tunelab.data.records import Example
from tunelab.errors import ConfigError, DataError, Problem
from tunelab.files import atomic_write_files, jsonl_text

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)

_NOT_WORD = re.compile(r"[^\w\s]|[\d_]+")
_NOT_WORD_KEEP_DIGITS = re.compile(r"[^\w\s]|_+")
_ASCII_NOT_WORD = bytes(c for c in range(128) if not (chr(c).isalpha() or chr(c).isspace()))
_ASCII_NOT_WORD_KEEP_DIGITS = bytes(
    c for c in range(128) if not (chr(c).isalnum() or chr(c).isspace())
)


def normalize(text: str, *, digits: bool = True) -> str:
    """Lowercase, drop punctuation, collapse whitespace; drop digits only when asked.

    ``digits=True`` keeps digits: prompts that differ only in their numbers ("What is 7 + 5?")
    are different prompts for splitting and overlap. ``digits=False`` drops them too, for
    near-duplicate *instructions* and diversity ("order 12" and "order 13" share a template).
    """
    text = text.lower()
    if text.isascii():  # the same result as the regex, ten times faster
        table = _ASCII_NOT_WORD_KEEP_DIGITS if digits else _ASCII_NOT_WORD
        return " ".join(text.encode().translate(None, table).decode().split())
    return " ".join((_NOT_WORD_KEEP_DIGITS if digits else _NOT_WORD).sub("", text).split())


def check_ratios(ratios: Sequence[float]) -> None:
    """Raise ConfigError unless every ratio is positive and they sum to 1 (within 1e-6)."""
    shown = _show(ratios)
    if not ratios:
        raise ConfigError("split ratios are empty (expected e.g. 0.7/0.15/0.15)")
    if not all(isinstance(r, Real) and math.isfinite(r) and r > 0 for r in ratios):
        raise ConfigError(f"split ratios {shown} must all be positive numbers")
    total = math.fsum(ratios)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"split ratios {shown} must sum to 1 (they sum to {total:g})")


def split_indices(
    examples: Sequence[Example],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    *,
    names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Indices of ``examples`` per split (ascending), one list per ratio.

    Raises ConfigError for bad ratios and DataError when a split would be empty."""
    check_ratios(ratios)
    names = _names(names, len(ratios))
    n, s = len(examples), len(ratios)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(normalize(ex.prompt_key), []).append(i)
    targets = _targets(n, ratios)
    if len(groups) < s or min(targets) < 1:
        raise DataError(_too_few(examples, len(groups), ratios, names, targets))
    keys = list(groups)  # first-appearance order, so the shuffle depends only on the data
    random.Random(seed).shuffle(keys)
    out: list[list[int]] = [[] for _ in ratios]
    sizes = [0] * s
    k = 0
    for g, key in enumerate(keys):
        left = len(keys) - g  # groups still to place, this one included
        # Move on when this split is full, or when the groups left are only just enough to
        # give each later split one (a large duplicate group must not starve the last split).
        while k < s - 1 and sizes[k] > 0 and (sizes[k] >= targets[k] or left <= s - 1 - k):
            k += 1
        out[k].extend(groups[key])
        sizes[k] += len(groups[key])
    for part in out:
        part.sort()
    return out


def split_examples(
    examples: Sequence[Example], ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0
) -> list[list[Example]]:
    """``examples`` divided into one list per ratio (see :func:`split_indices`)."""
    return [[examples[i] for i in part] for part in split_indices(examples, ratios, seed)]


def write_splits(
    rows: Sequence[Row],
    splits: Sequence[Sequence[int]],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/<name>.jsonl`` for each split: the original fields of ``rows[i]``.

    ``rows`` must be aligned with the examples the indices came from (``parse_examples``
    keeps one example per row, in order)."""
    names = _names(names, len(splits))
    out_dir = Path(out_dir)
    return write_jsonl_atomic_many(
        (out_dir / f"{name}.jsonl", (rows[i].fields for i in part))
        for name, part in zip(names, splits, strict=True)
    )


def write_jsonl_atomic(path: str | Path, records: Iterable[Mapping]) -> Path:
    """Write one JSONL file atomically (temporary file in the same folder, then rename)."""
    return write_jsonl_atomic_many([(path, records)])[0]


def write_jsonl_atomic_many(
    files: Iterable[tuple[str | Path, Iterable[Mapping]]],
) -> list[Path]:
    """Write several JSONL files: all temporary files first, then rename them all.

    On any error while writing, the temporary files are removed and no target is touched.
    (Renames in one folder do not fail in practice; if one did, earlier targets stay replaced.)"""
    contents = {Path(path): jsonl_text(records).encode("utf-8") for path, records in files}
    atomic_write_files(contents)
    return list(contents)


# -- helpers -----------------------------------------------------------------------------------
def _show(ratios: Sequence[float]) -> str:
    return "/".join(f"{r:g}" if isinstance(r, Real) else repr(r) for r in ratios)


def _names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return (
            list(SPLIT_NAMES[:count])
            if count <= len(SPLIT_NAMES)
            else [f"split{i + 1}" for i in range(count)]
        )
    if len(names) != count:
        raise ValueError(f"{len(names)} split names for {count} splits")
    return list(names)


def _targets(n: int, ratios: Sequence[float]) -> list[int]:
    """Records wanted per split: round(ratio * n), the last split takes the rest."""
    head = [round(r * n) for r in ratios[:-1]]
    return [*head, n - sum(head)]


def _too_few(
    examples: Sequence[Example],
    groups: int,
    ratios: Sequence[float],
    names: list[str],
    targets: list[int],
) -> Problem:
    n, s = len(examples), len(ratios)
    file = examples[0].source.file if examples else "data"
    head = f"{n} records ({groups} distinct prompts) cannot fill {s} splits with ratios {_show(ratios)}"
    empty = next((name for name, t in zip(names, targets, strict=True) if t < 1), None)
    if empty is not None:
        need = n + 1
        while min(_targets(need, ratios)) < 1:
            need += 1
        need = max(need, s)
        msg = f"{head}: the {empty} split would be empty; need at least {need} records"
    else:
        msg = (
            f"{head}: need at least {s} distinct prompts "
            "(records with the same normalised prompt always go to the same split)"
        )
    return Problem(file, None, None, msg)
