"""Load a tokenizer from a catalog name, a model or tokenizer folder, a .gguf file or a hub id.

Names are resolved like models (:func:`tunelab.models.load.resolve_model`), so ``data check``
counts with exactly the tokenizer that training will use: a catalog model's tokenizer is read
from its converted folder. Two differences: a folder needs only tokenizer files (no
config.json), and a .gguf file that has not been converted yet is read directly (~10 s) rather
than converted, since checking data needs no weights. A tokenizer without a pad token gets
pad = EOS.
"""

from __future__ import annotations

import json
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
    try:
        direct = _generic_class(source) if isinstance(source, Path) else None
        if direct is not None:
            return direct.from_pretrained(source)
        from transformers import AutoTokenizer  # ~0.7 s of imports: only when needed

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


#: Model types for which AutoTokenizer loads a ``TokenizersBackend`` tokenizer_config as that
#: generic class (no model-specific tokenizer in transformers; tests/unit/test_tokenizer_parity.py
#: checks this against the installed transformers).
GENERIC_TOKENIZER_MODEL_TYPES = frozenset({"llama"})


def _generic_class(folder: Path):
    """The class ``AutoTokenizer`` would pick, without the ~1.5 s it spends importing its
    mappings and the model's config class to decide — only where the answer is certain:
    ``tokenizer_config.json`` names the generic ``TokenizersBackend``, without remote code or a
    Mistral ``tekken.json``, for a model type in :data:`GENERIC_TOKENIZER_MODEL_TYPES`.
    None: ask AutoTokenizer. (It keeps ``tunelab train --dry-run`` quick.)"""
    try:
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    generic = (
        isinstance(tok_cfg, dict)
        and isinstance(config, dict)
        and tok_cfg.get("tokenizer_class") == "TokenizersBackend"
        and "auto_map" not in tok_cfg
        and not (folder / "tekken.json").exists()
        and config.get("model_type") in GENERIC_TOKENIZER_MODEL_TYPES
    )
    if not generic:
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    return TokenizersBackend


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
