"""Find and load a causal language model: a catalog name, a Hugging Face model folder, a .gguf
file, or a hub id.

Everything goes through one path: :func:`resolve_model` turns the name into a Hugging Face model
folder (catalog models and .gguf files are converted to one, once, and cached under
``$TUNELAB_HOME``) or leaves a hub id as it is; :func:`load_model` then loads it with
``from_pretrained``. A bad model is reported as a :class:`~tunelab.errors.ModelError` that names
the file and what was found in it, never as a traceback. See docs/models.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ModelError
from tunelab.files import atomic_write_json, file_sha256
from tunelab.models import catalog
from tunelab.models.catalog import first_line

if TYPE_CHECKING:  # imported where weights are loaded: `tunelab plan` reads no torch
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"
NO_CUDA = "QLoRA needs a CUDA GPU with bitsandbytes; this machine has none — use method.name=lora"


def resolve_model(name: str) -> Path | str:
    """A catalog name -> its converted folder (pulled and converted on first use); a model
    folder -> itself (it must hold config.json); a .gguf file -> a folder converted from it once
    (:func:`gguf_folder`); anything meant as a path (:func:`looks_local`) that does not exist
    -> ModelError at once; anything else is a hub id and is returned unchanged, once the hub is
    known to be reachable or to have a cached copy (else a ModelError at once, instead of the
    hub client's minute of retries)."""
    if name in catalog.CATALOG:
        return catalog.pull(name)
    path = Path(name).expanduser()
    if is_run(path):
        return run_final(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelError(f"{path}: not a model folder: no config.json ({_contents(path)})")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            folder = gguf_folder(path)
            if (folder / "config.json").is_file():
                return folder
            return catalog.convert_gguf(path, folder, source=str(path.resolve()))
        hint = "; pass the folder that holds it" if path.name == "config.json" else ""
        raise ModelError(f"{path}: a file, not a model folder or .gguf file{hint}")
    if looks_local(name) or not _HUB_ID.fullmatch(name):
        top = None if _spelled_as_path(name) else _local_top(name)
        why = f"; {top}/ is a folder here, so this is read as a path, not a hub id" if top else ""
        raise ModelError(
            f"{name}: not found: no such folder or file (not a model folder or .gguf file on "
            f"this machine{why}), and not a catalog model (catalog models: "
            f"{', '.join(catalog.CATALOG)})"
        )
    _check_hub(name)
    return name


# -- a finished run as a model ---------------------------------------------------------------
RUN_CONFIG = "config.yaml"  # what makes a folder a tunelab run folder
ADAPTER_CONFIG = "adapter_config.json"


def is_run(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file()


def run_final(path: Path) -> Path:
    """The weights a run folder ends with: its final/ folder (a full model, or an adapter)."""
    final = path / "final"
    if not (final / "config.json").is_file() and not (final / ADAPTER_CONFIG).is_file():
        raise ModelError(
            f"{path}: a run folder without finished weights (no final/ model or adapter: "
            "is it still running? resume it with --resume)"
        )
    return final


def run_adapter(name: str) -> tuple[str, Path] | None:
    """(the base model's name, the adapter folder) when ``name`` is a run folder that ended as
    a LoRA adapter; None otherwise. The run's base is read from its config.yaml, so a run that
    continued another run resolves down to the first base."""
    path = Path(name).expanduser()
    if not is_run(path) or not (run_final(path) / ADAPTER_CONFIG).is_file():
        return None
    from tunelab.config.load import load_config

    return load_config(path / RUN_CONFIG).model.name, path / "final"


#: Endings of files a user may pass by mistake; hub ids never end in these.
_FILE_SUFFIXES = (".gguf", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".ckpt", *WEIGHT_SUFFIXES)


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path (and so must not be tried on the hub). Hub ids are
    ``name`` or ``owner/name``: a path starts with ``.``, ``/`` or ``~``, ends with ``/``, has
    more than one ``/``, ends in a file suffix (``.gguf``, ``.json``, ``.safetensors``...), or
    its first component is a folder here (``runs/missing`` when ``runs/`` exists)."""
    return _spelled_as_path(name) or _local_top(name) is not None


def _spelled_as_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or name.lower().endswith(_FILE_SUFFIXES)
    )


def _local_top(name: str) -> str | None:
    """The first component of ``owner/name`` when it is a folder here, else None."""
    top, sep, _ = name.partition("/")
    return top if sep and top and Path(top).expanduser().is_dir() else None


def _check_hub(name: str) -> None:
    """Nothing when the hub may provide ``name``: it is reachable (or a proxy is set: not
    probed), or it has a cached copy. Else a one-line ModelError."""
    import huggingface_hub
    from huggingface_hub import constants

    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)  # fmt: skip
    if offline is None:
        return
    with contextlib.suppress(Exception):  # an invalid repo id for the cache: no cached copy
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return  # transformers falls back to the cached copy at once
    raise ModelError(
        f"{name}: not a catalog model ({', '.join(catalog.CATALOG)}), not a local folder or "
        f".gguf file, and the hub could not provide it ({offline}, and no cached copy)"
    )


@functools.lru_cache(maxsize=4)
def _hub_unreachable(endpoint: str) -> str | None:
    """None when a TCP connection to the hub opens within 3 s (or a proxy is configured: then
    the hub client is left to find out); else why not, e.g. "huggingface.co cannot be reached:
    [Errno -2] Name or service not known". Asked once per process."""
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host} cannot be reached: {first_line(e) or type(e).__name__}"
    return None


def gguf_folder(path: Path) -> Path:
    """The cache folder a .gguf file converts to: ``$TUNELAB_HOME/gguf/<stem>-<key>/``, keyed by
    the file's absolute path, size and modification time, so an edited or replaced file is
    converted again (and two files of the same name and size are never confused)."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return catalog.home() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def load_model(
    name: str,
    *,
    dtype: torch.dtype | None = None,  # float32
    device: str = "cpu",
    quantize_bits: int | None = None,
    tokenizer: str | None = None,
):
    """Load ``(model, tokenizer)`` (see :func:`load_weights`). The tokenizer comes from
    ``tokenizer`` if given, else from the model; a missing pad token is set to EOS."""
    from tunelab.models.tokenizer import load_tokenizer

    model = load_weights(name, dtype=dtype, device=device, quantize_bits=quantize_bits)
    tok = load_tokenizer(tokenizer if tokenizer is not None else resolve_model(name))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_model_config(name: str, *, need_weights: bool = True) -> dict:
    """The model's ``config.json`` as a dict (architecture and sizes): no weights, and none of
    transformers' model modules imported (a second saved on a dry run). A local folder without
    any weight file is refused here, before anything else is done (its files are listed, not
    read) — unless ``need_weights`` is false (``tunelab plan`` sizes a model from its config
    alone). A run folder that ended as an adapter has its base model's config."""
    adapter = run_adapter(name)
    if adapter is not None:
        return load_model_config(adapter[0], need_weights=need_weights)
    source = resolve_model(name)
    if isinstance(source, Path):
        if need_weights and not any(p.suffix in WEIGHT_SUFFIXES for p in source.iterdir()):
            raise ModelError(f"{source}: no weights (model*.safetensors) in this folder")
        path = source / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot read the model's config ({first_line(e)})") from None
        if not isinstance(config, dict):
            raise ModelError(f"{path}: expected a JSON object")
        return config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(f"{source}: cannot read the model's config ({first_line(e)})") from None


def describe_config(config: dict) -> str:
    """'llama, 30 layers, hidden 576, vocab 49,152' from a model's config.json."""
    text = config.get("text_config") or config
    parts = [str(config.get("model_type", "unknown type"))]
    for label, key in (
        ("layers", "num_hidden_layers"),
        ("hidden", "hidden_size"),
        ("vocab", "vocab_size"),
    ):
        value = text.get(key, config.get(key))
        if isinstance(value, int):
            parts.append(f"{value:,} {label}" if label == "layers" else f"{label} {value:,}")
    return ", ".join(parts)


def load_weights(
    name: str,
    *,
    dtype: torch.dtype | None = None,  # float32
    device: str = "cpu",
    quantize_bits: int | None = None,
):
    """Load the causal LM ``name`` resolves to. ``quantize_bits`` 4 or 8 loads the weights with
    bitsandbytes (QLoRA; CUDA only, checked before anything is loaded). A run folder that ended
    as a LoRA adapter loads as its base with the adapter merged in (the model the run made)."""
    adapter = run_adapter(name)
    if adapter is not None:
        return _merged(*adapter, dtype=dtype, device=device, quantize_bits=quantize_bits)
    if quantize_bits:
        _check_cuda(device)
    return _load(name, dtype=dtype, device=device, quantize_bits=quantize_bits)


def load_quantized(name: str, bits: int, *, dtype: torch.dtype, device: str = "cpu"):
    """``name`` quantised exactly as a QLoRA run's base was loaded for training (same
    bitsandbytes settings, same weight dtype before quantisation) — on the CPU too, where
    bitsandbytes (>= 0.48) can quantise and de-quantise: ``tunelab merge`` rebuilds the 4-bit base
    a QLoRA adapter was trained on without a GPU."""
    return _load(name, dtype=dtype, device=device, quantize_bits=bits)


def _load(name: str, *, dtype: torch.dtype | None, device: str, quantize_bits: int | None):
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    quantization = _bnb_config(quantize_bits, device) if quantize_bits else None
    source = resolve_model(name)
    if isinstance(source, Path):
        check_weights(source)
    kwargs: dict = {"dtype": torch.float32 if dtype is None else dtype}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, attn_implementation="sdpa", **kwargs
            )
        except ValueError as e:
            if "sdpa" not in str(e) and "scaled_dot_product" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(
                source, attn_implementation="eager", **kwargs
            )
    except (OSError, ValueError, SafetensorError) as e:
        raise _load_error(name, source, e) from None
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        if isinstance(source, Path):
            raise  # a bug, not a bad folder: keep the traceback
        raise _load_error(name, source, e) from None
    if quantization is None:
        model.to(device)
    return model


def _merged(base: str, adapter: Path, *, dtype, device: str, quantize_bits: int | None):
    from peft import PeftModel

    from tunelab.models.methods.lora import merge_and_unload

    if quantize_bits:
        raise ModelError(
            f"{adapter.parent}: a LoRA run cannot be the base of a QLoRA run (merging into 4/8-bit "
            "weights loses the adapter's precision): continue with method.name=lora, or merge it "
            "into a full model folder first"
        )
    model = load_weights(base, dtype=dtype, device=device)
    return merge_and_unload(PeftModel.from_pretrained(model, adapter))


def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ModelError(NO_CUDA)
    if not str(device).startswith("cuda"):
        raise ModelError(f"QLoRA needs the model on the CUDA GPU, not on {device!r}")


def _bnb_config(bits: int, device: str):
    """The one quantisation QLoRA trains on (and merge rebuilds): NF4 with double quantisation,
    or bitsandbytes' 8-bit; computing in half on CUDA, in fp32 on the CPU."""
    if bits not in (4, 8):
        raise ModelError(f"quantize_bits must be 4 or 8, not {bits}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "QLoRA needs bitsandbytes, which is not installed: pip install bitsandbytes"
        ) from None
    if not str(device).startswith("cuda") and _version(bitsandbytes.__version__) < (0, 48):
        raise ModelError(
            f"bitsandbytes {bitsandbytes.__version__} quantises on CUDA only; on the CPU it needs "
            "0.48 or newer: pip install -U bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_compute_dtype(device),
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _compute_dtype(device: str) -> torch.dtype:
    import torch

    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_error(name: str, source: Path | str, e: Exception) -> ModelError:
    if isinstance(source, Path):
        weights = [p.name for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        if not weights:
            return ModelError(f"{source}: no weights (model*.safetensors) in this folder")
        return ModelError(f"{source}: could not load the model ({first_line(e)})")
    return ModelError(
        f"{name}: not a catalog model ({', '.join(catalog.CATALOG)}), not a local folder or "
        f".gguf file, and the hub could not provide it ({first_line(e)})"
    )


# -- checks ------------------------------------------------------------------------------------
def check_weights(folder: Path) -> None:
    """Check every ``*.safetensors`` file in ``folder`` is whole: a header that parses and
    tensor data that ends exactly at the end of the file. Cheap (reads only the headers)."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise ModelError(f"{path}: not a valid safetensors file: {problem}")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"its header claims {n:,} bytes but the file has {size:,} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header (JSON with data_offsets)"
    need = 8 + n + max(ends, default=0)
    if need != size:
        return f"its tensors need {need:,} bytes but the file has {size:,} (truncated?)"
    return None


def _contents(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "the folder is empty"
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    hint = f"; to use the GGUF, pass {folder / ggufs[0]}" if len(ggufs) == 1 else ""
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return f"found: {shown}{hint}"


# -- fingerprint -------------------------------------------------------------------------------
def model_fingerprint(name: str, *, read_weights: bool = True) -> str:
    """A short stable hash of the weights ``name`` resolves to: config.json plus the name, size
    and SHA-256 of each weight file (hashes cached by path, size and mtime, so only a changed
    file is read again). For a hub id it is the id itself.

    ``read_weights=False`` never opens a weight file (for a dry run): it hashes config.json and
    the weight files' names and sizes only, and says so with a ``shallow:`` prefix. A run that
    ended as an adapter: its base's fingerprint and the adapter's files."""
    adapter = run_adapter(name)
    if adapter is not None:
        digest = hashlib.sha256(model_fingerprint(adapter[0], read_weights=read_weights).encode())
        for path in sorted(adapter[1].iterdir()):
            if path.suffix in WEIGHT_SUFFIXES or path.name == ADAPTER_CONFIG:
                content = _file_sha256(path) if read_weights else ""
                digest.update(f"\0{path.name}\0{path.stat().st_size}\0{content}".encode())
        return digest.hexdigest()[:16] if read_weights else f"shallow:{digest.hexdigest()[:16]}"
    source = resolve_model(name)
    if isinstance(source, str):
        return hashlib.sha256(f"hub:{source}".encode()).hexdigest()[:16]
    digest = hashlib.sha256((source / "config.json").read_bytes())
    for path in sorted(p for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        content = _file_sha256(path) if read_weights else ""
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0{content}".encode())
    return digest.hexdigest()[:16] if read_weights else f"shallow:{digest.hexdigest()[:16]}"


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered in ``$TUNELAB_HOME/fingerprints.json`` per absolute path
    together with the size and mtime it had (entries of deleted files are dropped)."""
    stat, where = path.stat(), str(path.resolve())
    cache_file = catalog.home() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(where)
    if hit and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
        return hit["sha256"]
    sha = file_sha256(path)
    cache = {k: v for k, v in cache.items() if Path(k).exists()}
    cache[where] = {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha,
    }
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        atomic_write_json(cache_file, cache)
    return sha
