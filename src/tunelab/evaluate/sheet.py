"""A blind human-rating sheet: each system's answer side by side, systems hidden behind letters.

``rating_sheet.csv`` has one row per item: ``item, prompt, reference, answer_A, answer_B, ...``,
then empty ``rating_A, rating_B, ...`` and ``notes`` columns for the rater. Both the rows and,
within each row, the systems behind the letters are shuffled with ``random.Random(seed)``, so
neither the order nor a column tells a rater which system wrote an answer. ``rating_key.csv``
(``item, A, B, ...``: the system behind each letter in each row) un-blinds the sheet;
:func:`read_ratings` joins a filled sheet with its key.

Items are numbered from 1 in the order of ``prompts``. Files are UTF-8 with a byte-order mark
(spreadsheets then show non-ASCII text correctly) and written atomically. Cell text is written
as it is: import the sheet into a spreadsheet as text if answers may start with ``=``.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from tunelab.errors import DataError, Problem
from tunelab.files import atomic_write_bytes

SHEET_NAME = "rating_sheet.csv"
KEY_NAME = "rating_key.csv"
_ENCODING = "utf-8-sig"


def letters(n: int) -> list[str]:
    """A, B, ..., Z, AA, AB, ...: the first ``n`` column letters."""
    out = []
    for i in range(n):
        name, i = "", i + 1
        while i:
            i, rest = divmod(i - 1, 26)
            name = chr(ord("A") + rest) + name
        out.append(name)
    return out


def write_rating_sheet(
    out_dir: str | Path,
    prompts: Sequence[str],
    references: Sequence[str | None] | None,
    systems: Mapping[str, Sequence[str]],
    *,
    seed: int = 0,
    prefix: str = "",
) -> tuple[Path, Path]:
    """Write ``rating_sheet.csv`` and ``rating_key.csv`` into ``out_dir``; return their paths.

    ``systems`` maps each system's name to its answers, one per prompt (``references`` may be
    None: the column is then empty). ``prefix`` is put before both file names (``base-`` gives
    ``base-rating_sheet.csv``). Raises :class:`DataError` when the counts differ."""
    n = len(prompts)
    problems = []
    if not systems:
        problems.append(Problem("rating sheet", None, "systems", "no systems to compare"))
    if references is not None and len(references) != n:
        problems.append(
            Problem("rating sheet", None, "references", _count(len(references), n, "references"))
        )
    for name, answers in systems.items():
        if not str(name).strip():
            problems.append(Problem("rating sheet", None, "systems", "a system has no name"))
        if len(answers) != n:
            problems.append(
                Problem("rating sheet", None, f"systems.{name}", _count(len(answers), n, "answers"))
            )
    if problems:
        raise DataError(problems)

    names = list(systems)
    cols = letters(len(names))
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    sheet_rows, key_rows = [], []
    for i in order:
        behind = names[:]
        rng.shuffle(behind)
        reference = references[i] if references is not None else None
        sheet_rows.append(
            [i + 1, prompts[i], "" if reference is None else reference]
            + [systems[name][i] for name in behind]
            + [""] * len(cols)
            + [""]
        )
        key_rows.append([i + 1, *behind])

    header = ["item", "prompt", "reference"]
    header += [f"answer_{c}" for c in cols] + [f"rating_{c}" for c in cols] + ["notes"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet, key = out_dir / f"{prefix}{SHEET_NAME}", out_dir / f"{prefix}{KEY_NAME}"
    atomic_write_bytes(key, _csv([["item", *cols], *sorted(key_rows)]))
    atomic_write_bytes(sheet, _csv([header, *sheet_rows]))
    return sheet, key


def read_ratings(
    sheet: str | Path, key: str | Path, *, keep_missing: bool = False
) -> dict[str, list[float]] | dict[str, list[float | None]]:
    """Un-blind a filled sheet: ``{system: [rating, ...]}`` in item order.

    Empty rating cells are left out (``keep_missing=True`` keeps them as None, so the lists
    stay aligned item by item across systems, as paired statistics need). A cell that is not
    a number, or an item the key does not know, raises :class:`DataError` naming each cell."""
    sheet, key = Path(sheet), Path(key)
    key_rows = _read(key)
    problems = []
    key_header = key_rows[0] if key_rows else []
    if key_header[:1] != ["item"] or len(key_header) < 2:
        raise DataError(Problem(str(key), 1, None, "not a rating key (expected item, A, B, ...)"))
    cols = key_header[1:]
    behind: dict[str, dict[str, str]] = {}  # item -> letter -> system
    for line, row in enumerate(key_rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(key_header):
            problems.append(
                Problem(str(key), line, None, f"{len(row)} cells, expected {len(key_header)}")
            )
            continue
        behind[row[0].strip()] = dict(zip(cols, row[1:], strict=True))
    if problems:
        raise DataError(problems)

    sheet_rows = _read(sheet)
    header = sheet_rows[0] if sheet_rows else []
    where = {name: i for i, name in enumerate(header)}
    missing = [c for c in ["item"] + [f"rating_{c}" for c in cols] if c not in where]
    if missing:
        raise DataError(Problem(str(sheet), 1, None, f"missing column(s): {', '.join(missing)}"))

    rated: dict[str, dict[str, float | None]] = {}  # item -> system -> rating
    for line, row in enumerate(sheet_rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = row + [""] * (len(header) - len(row))
        item = cells[where["item"]].strip()
        if item not in behind:
            problems.append(Problem(str(sheet), line, "item", f"{item!r} is not in {key.name}"))
            continue
        if item in rated:
            problems.append(Problem(str(sheet), line, "item", f"item {item} appears twice"))
            continue
        rated[item] = {}
        for c in cols:
            cell = cells[where[f"rating_{c}"]].strip()
            try:
                value = float(cell) if cell else None
                if value is not None and not math.isfinite(value):
                    raise ValueError(cell)
            except ValueError:
                problems.append(Problem(str(sheet), line, f"rating_{c}", f"not a number: {cell!r}"))
                continue
            rated[item][behind[item][c]] = value
    if problems:
        raise DataError(problems)

    systems = sorted({name for row in behind.values() for name in row.values()})
    out: dict[str, list] = {name: [] for name in systems}
    for item in sorted(rated, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s)):
        for name in systems:
            value = rated[item].get(name)
            if value is not None or keep_missing:
                out[name].append(value)
    return out


def _count(got: int, want: int, what: str) -> str:
    return f"{got} {what} for {want} prompts (expected one per prompt)"


def _csv(rows: list[list]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode(_ENCODING)


def _read(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding=_ENCODING)
    except FileNotFoundError:
        raise DataError(Problem(str(path), None, None, "file not found")) from None
    except UnicodeDecodeError as e:
        raise DataError(Problem(str(path), None, None, f"not UTF-8 text: {e}")) from None
    return list(csv.reader(io.StringIO(text, newline="")))
