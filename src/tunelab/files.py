"""Files written so a crash never leaves half of one, files hashed, JSONL read — one helper each.

Everything in tunelab that writes a result (a checkpoint pointer, a summary, an evaluation, a
split, a converted model) goes through :func:`atomic_write_bytes` / :func:`atomic_write_text`
or, for a folder, :func:`atomic_folder`: the new content is written next to the target under a
``.tmp-`` name, fsync'd, and renamed over it, so readers see the old content or the new, never
a mix. :func:`read_jsonl` is the one JSON-lines reader (data files, predictions, metrics logs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tunelab.errors import DataError, Problem

# ---- atomic writes -----------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable. A no-op where folders can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


@contextlib.contextmanager
def _temp_beside(path: Path, mode: str = "wb") -> Iterator[tuple[IO, str]]:
    """An open temporary file next to ``path`` (``.tmp-<name>-*``, ordinary permissions),
    flushed and fsync'd on leaving; removed if the body raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are ordinary files
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(path) as f: f.write(...)`` — readers see the old content or the new.

    The temporary file (``.tmp-<name>-*`` next to ``path``) is fsync'd, renamed over ``path``
    with ``os.replace``, then the folder is fsync'd; on an exception it is removed and ``path``
    is untouched. Missing parent folders are created."""
    path = Path(path)
    with _temp_beside(path, mode) as (f, tmp):
        yield f
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(out) as tmp: some_library.write(tmp)`` — for writers that open the
    file themselves: ``tmp`` (beside ``out``) is fsync'd and renamed over ``out``; removed if
    the body raises, ``out`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``path`` at once (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_files(contents: dict[Path, bytes]) -> None:
    """Write several files so that none changes unless all could be written: every temporary
    file is written and fsync'd first, then each is renamed into place."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in contents.items():
            with _temp_beside(Path(path)) as (f, tmp):
                f.write(data)
            temps.append((tmp, Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    for parent in {path.parent for _, path in temps}:
        fsync_dir(parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: object) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def jsonl_text(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, first_wins: bool = False) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp: write files into tmp`` — then ``tmp`` becomes ``out``.

    On an exception the temporary folder is removed and ``out`` is left as it was. An existing
    ``out`` is moved aside first and deleted only after the new folder is in place — or, with
    ``first_wins`` (a cache that another process may fill at the same time), kept, and the new
    folder dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; results are ordinary folders
    try:
        yield tmp
        fsync_tree(tmp)
        if first_wins and path.exists():
            return
        old = None
        if path.exists():  # moved aside, deleted only once the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
            os.rename(path, old / path.name)
            fsync_dir(path.parent)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:  # put the old folder back
                os.rename(old / path.name, path)
                shutil.rmtree(old, ignore_errors=True)
            if not (first_wins and path.exists()):  # else: a concurrent writer won the race
                raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- hashing -----------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ---- JSON lines --------------------------------------------------------------------------------


def read_jsonl(
    path: str | Path,
    text: str | None = None,
    *,
    torn_tail: bool = False,
    problems: list[Problem] | None = None,
) -> list[tuple[int, dict]]:
    """``[(line number, record), ...]`` for every non-blank line of a JSON-lines file.

    Every bad line (invalid JSON, not an object) is collected and raised as one
    :class:`DataError` naming the file and line. ``text``: the already decoded content.
    ``torn_tail``: the text after the last newline is a record still being written (an
    append-only log): ignore it. ``problems``: collect the bad lines there instead of raising
    (for a caller that checks more and reports everything together)."""
    if text is None:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if torn_tail:
        lines.pop()
    out: list[tuple[int, dict]] = []
    found: list[Problem] = [] if problems is None else problems
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            found.append(
                Problem(str(path), lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")
            )
            continue
        if not isinstance(record, dict):
            kind = type(record).__name__
            found.append(Problem(str(path), lineno, None, f"expected a JSON object, found {kind}"))
            continue
        out.append((lineno, record))
    if found and problems is None:
        raise DataError(found)
    return out
