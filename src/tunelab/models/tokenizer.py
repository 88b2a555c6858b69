"""Load a tokenizer from a catalog name, a model or tokenizer folder, a .gguf file or a hub id.

Names are resolved like models (:func:`tunelab.models.load.resolve_model`), so ``data check``
counts with exactly the tokenizer that training will use: a catalog model's tokenizer is read
from its converted folder. Two differences: a folder needs only tokenizer files (no
config.json), and a .gguf file that has not been converted yet is read directly (~10 s) rather
than converted, since checking data needs no weights. A tokenizer without a pad token gets
pad = EOS.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import ModelError
from tunelab.models import catalog
from tunelab.models.catalog import first_line


def load_tokenizer(name_or_path: str | os.PathLike):
    from tunelab.models.load import gguf_folder, resolve_model

    name = str(name_or_path)
    path = Path(name).expanduser()
    local = name not in catalog.CATALOG
    if local and path.is_file() and path.suffix.lower() == ".gguf":
        converted = gguf_folder(path)
        if not (converted / "config.json").is_file():
            return _with_pad(_from_gguf(path))
        source: Path | str = converted
    elif local and path.is_dir():
        source = path
    else:
        source = resolve_model(name)
    return _with_pad(_from_pretrained(name, source))


def _from_pretrained(name: str, source: Path | str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        if isinstance(source, Path):
            raise ModelError(
                f"{source}: no usable tokenizer in this folder ({first_line(e)})"
            ) from None
        raise ModelError(
            f"{name}: not a catalog model ({', '.join(catalog.CATALOG)}), not a local "
            f"folder or .gguf file, and the hub could not provide it ({first_line(e)})"
        ) from None


def _with_pad(tok):
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _from_gguf(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a corrupt file fails deep inside gguf
        raise ModelError(
            f"{path}: could not read a tokenizer from this GGUF file ({first_line(e)})"
        ) from None


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding is masked
    out of attention and loss either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
