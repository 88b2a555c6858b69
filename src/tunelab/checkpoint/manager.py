"""Atomic checkpoints in a run folder.

Layout (``run_dir/checkpoints/``)::

    step-000100/        a complete checkpoint (only ever created by a rename)
    step-000200/
    latest              pointer file: the folder name of the newest checkpoint
    best                pointer file: the folder name of the best checkpoint (when metrics given)
    best.json           {"step": 100, "metric": 1.23}: the source of truth for "best"
    .tmp-*              work in progress or left by a killed process: ignored, cleaned on save

Every step folder holds ``manifest.json`` (each file's size and SHA-256), written last inside
the temporary folder; :func:`verify` checks a folder against it before a resume trusts it.

A checkpoint is written into a temporary folder, every file and the folder are fsync'd, and
only then is the folder renamed to ``step-NNNNNN``. A rename within one file system is atomic,
so a ``step-*`` folder is always complete and a crash leaves at worst a ``.tmp-*`` folder that
nothing reads. Pointer files are replaced atomically (temp file + ``os.replace``) after the
rename, so ``latest`` never names a partial checkpoint. One process writes a run folder at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tunelab.files import atomic_folder, atomic_write_bytes, file_sha256, fsync_dir

_STEP_DIR = re.compile(r"step-(\d+)")
_SCRATCH_PREFIXES = (".tmp-", ".old-")


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint: ``step-000012``."""
    return f"step-{step:06d}"


MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """``manifest.json``: every file of a checkpoint with its size and SHA-256."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    }
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or altered file, or no
    manifest), or None when every file matches its manifest."""
    folder = Path(folder)
    try:
        entries = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        items = [(name, int(e["size"]), str(e["sha256"])) for name, e in entries.items()]
    except OSError:
        return f"{folder / MANIFEST}: missing (the checkpoint cannot be verified)"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{folder / MANIFEST}: not a valid manifest"
    for name, size, sha in items:
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size:,} bytes, the manifest says {size:,} (truncated?)"
        if file_sha256(path) != sha:
            return f"{path}: its content does not match the manifest's checksum (damaged)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class CheckpointManager:
    """Save, find and prune the checkpoints of one run.

    ``keep_last`` step folders are kept (the newest by step), plus the best one and always the
    one ``latest`` names."""

    def __init__(self, run_dir: Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    # ---- reading -------------------------------------------------------------------------

    def list(self) -> list[Path]:
        """The complete checkpoint folders, sorted by step."""
        if not self.dir.is_dir():
            return []
        found = []
        for entry in self.dir.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The folder ``latest`` names; the newest complete folder if that one is gone."""
        named = self._read_pointer("latest")
        if named is not None:
            return named
        folders = self.list()
        return folders[-1] if folders else None

    def best(self) -> Path | None:
        """The folder with the best metric so far (None without metrics or if it was deleted)."""
        record = self._best_record()
        if record is None:
            return None
        path = self.dir / step_name(record["step"])
        return path if path.is_dir() else None

    def best_metric(self) -> float | None:
        record = self._best_record()
        return None if record is None else float(record["metric"])

    def newest_first(self) -> list[Path]:
        """Every complete checkpoint folder, the one ``latest`` names first, then by step,
        newest first (the order a resume tries them in)."""
        folders = self.list()[::-1]
        latest = self.latest()
        return ([latest] if latest else []) + [f for f in folders if f != latest]

    @staticmethod
    def step_of(folder: Path) -> int:
        """The step a checkpoint folder holds: ``step-000012`` -> 12."""
        match = _STEP_DIR.fullmatch(Path(folder).name)
        if not match:
            raise ValueError(f"{folder} is not a checkpoint folder (step-NNNNNN)")
        return int(match.group(1))

    # ---- writing -------------------------------------------------------------------------

    def save(
        self,
        step: int,
        write: Callable[[Path], None],
        *,
        metric: float | None = None,
        lower_is_better: bool = True,
    ) -> Path:
        """Write the checkpoint of ``step`` and return its folder.

        ``write(folder)`` puts the files into a temporary folder. If it raises, the temporary
        folder is removed, the error propagates, and every earlier checkpoint and pointer is
        untouched. A ``metric`` better than the best so far makes this checkpoint the best."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._clean_scratch()
        name = step_name(step)
        final = self.dir / name
        # A resumed run may save the same step again: atomic_folder moves the old folder away,
        # puts the new one in place, then deletes the old one (or puts it back on failure).
        with atomic_folder(final) as tmp:
            write(tmp)
            write_manifest(tmp)

        self._write_pointer("latest", name)
        if metric is not None and self._is_better(metric, lower_is_better):
            data = json.dumps({"step": step, "metric": metric}, indent=2) + "\n"
            atomic_write_bytes(self.dir / "best.json", data.encode())
            self._write_pointer("best", name)
        self._prune(keep=final)
        return final

    # ---- internals -----------------------------------------------------------------------

    def _is_better(self, metric: float, lower_is_better: bool) -> bool:
        if not math.isfinite(metric):
            return False
        best = self.best_metric()
        if best is None or self.best() is None:
            return True
        return metric < best if lower_is_better else metric > best

    def _best_record(self) -> dict | None:
        try:
            record = json.loads((self.dir / "best.json").read_text(encoding="utf-8"))
            int(record["step"]), float(record["metric"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return record

    def _read_pointer(self, pointer: str) -> Path | None:
        try:
            name = (self.dir / pointer).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        path = self.dir / name
        return path if _STEP_DIR.fullmatch(name) and path.is_dir() else None

    def _write_pointer(self, pointer: str, name: str) -> None:
        atomic_write_bytes(self.dir / pointer, (name + "\n").encode())

    def _clean_scratch(self) -> None:
        for entry in self.dir.iterdir():
            if entry.name.startswith(_SCRATCH_PREFIXES):
                _remove(entry)

    def _prune(self, keep: Path) -> None:
        folders = self.list()
        protected = {keep, self.latest(), self.best(), *folders[-self.keep_last :]}
        for folder in folders:
            if folder not in protected:
                shutil.rmtree(self._move_away(folder), ignore_errors=True)

    def _move_away(self, folder: Path) -> Path:
        """Rename a step folder into scratch (``.old-*``) before deleting it, so that a crash
        mid-delete leaves scratch, never a partial step folder."""
        scratch = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=self.dir))
        os.rename(folder, scratch / folder.name)
        fsync_dir(self.dir)
        return scratch
