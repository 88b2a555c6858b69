"""Read rows from JSON arrays, JSONL and CSV files, remembering where each row came from.

A row is a plain ``dict`` plus its :class:`Source` (file and 1-based line). Parsing problems
are :class:`~tunelab.errors.DataError` with ``file:line`` (or the byte offset for bad UTF-8).
A UTF-8 byte-order mark and blank lines are accepted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError, Problem
from tunelab.files import read_jsonl

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class Source:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class Row:
    source: Source
    fields: dict


def read_text(path: str | Path) -> str:
    """Return the file decoded as UTF-8 (BOM stripped); bad bytes are a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(Problem(str(path), None, None, "file not found"))
    if path.is_dir():
        raise DataError(Problem(str(path), None, None, "is a folder, expected a data file"))
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.start + 4].hex(" ")
        raise DataError(
            Problem(
                str(path),
                line,
                None,
                f"not valid UTF-8 at byte offset {e.start} (bytes {bad}); "
                "re-encode the file as UTF-8",
            )
        ) from None


def read_rows(path: str | Path) -> list[Row]:
    """Read every row of a JSONL, JSON-array or CSV file."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    text = read_text(path)
    if kind is None:
        # Unknown suffix: sniff the content.
        head = text.lstrip()[:1]
        kind = "json" if head == "[" else "jsonl" if head == "{" else None
        if kind is None:
            raise DataError(
                Problem(str(path), None, None, "unknown file type (expected .jsonl, .json or .csv)")
            )
    if kind == "jsonl":
        head = text.lstrip()[:1]
        if head == "[":  # a JSON array saved as .jsonl
            kind = "json"
    rows = {"jsonl": _read_jsonl, "json": _read_json_array, "csv": _read_csv}[kind](str(path), text)
    if not rows:
        raise DataError(Problem(str(path), None, None, "the file has no records (it is empty)"))
    return rows


def _not_object(file: str, line: int, value: object) -> Problem:
    return Problem(file, line, None, f"expected a JSON object, found {type(value).__name__}")


def _read_jsonl(file: str, text: str) -> list[Row]:
    return [Row(Source(file, line), record) for line, record in read_jsonl(file, text)]


def _read_json_array(file: str, text: str) -> list[Row]:
    """Decode a JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(pos: int, msg: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        return DataError(Problem(file, line, None, f"invalid JSON: {msg}"))

    i = skip_ws(0)
    if i >= n:
        return []
    if text[i] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                Problem(file, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")
            ) from None
        raise DataError(
            Problem(
                file, 1, None, f"expected a JSON array of records, found {type(value).__name__}"
            )
        )
    rows: list[Row] = []
    line, counted = 1, 0
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return rows
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"{e.msg} (line {e.lineno}, column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(_not_object(file, line, value))
        rows.append(Row(Source(file, line), value))
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            break
        raise fail(i, "expected ',' or ']' after a record")
    return rows


def _read_csv(file: str, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    if not reader.fieldnames:
        return rows
    try:
        for record in reader:
            line = reader.line_num  # last physical line of the record
            if None in record:
                raise DataError(Problem(file, line, None, "more cells than header columns"))
            fields = {k: _csv_cell(v) for k, v in record.items() if v not in (None, "")}
            if fields:
                rows.append(Row(Source(file, line), fields))
    except csv.Error as e:
        raise DataError(Problem(file, reader.line_num, None, f"invalid CSV: {e}")) from None
    return rows


def _csv_cell(value: str) -> object:
    """CSV cells are strings; a cell holding a JSON list or object (messages, history) is parsed."""
    s = value.strip()
    if s[:1] in "[{" and s[-1:] in "]}":
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    return value
