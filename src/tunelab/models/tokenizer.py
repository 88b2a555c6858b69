"""Load a tokenizer from a catalog name, a model folder, a .gguf file or a hub id.

Reading a tokenizer out of a GGUF file takes transformers ~10 s, so for catalog models the
result is saved once as a normal tokenizer folder next to the GGUF and read from there after.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ModelError
from tunelab.models import catalog


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    if name_or_path in catalog.CATALOG:
        folder = catalog.model_dir(name_or_path) / "tokenizer"
        if not (folder / "tokenizer_config.json").exists():
            gguf = catalog.gguf_path(name_or_path)
            tok = _from_gguf(gguf)
            tmp = folder.with_name("tokenizer.part")
            tok.save_pretrained(tmp)
            tmp.replace(folder)
            return tok
        return AutoTokenizer.from_pretrained(folder)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        return _from_gguf(path)
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"{path}: no usable tokenizer in this folder ({_first_line(e)})"
            ) from None
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelError(
            f"{name_or_path}: not a model folder or .gguf file (catalog models: {', '.join(catalog.CATALOG)})"
        )
    try:  # a hub id
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(
            f"{name_or_path}: not a catalog model, a local folder, a .gguf file, "
            f"or a reachable hub id ({_first_line(e)}); catalog: {', '.join(catalog.CATALOG)}"
        ) from None


def _from_gguf(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a corrupt file fails deep inside gguf
        raise ModelError(
            f"{path}: could not read a tokenizer from this GGUF file ({_first_line(e)})"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
