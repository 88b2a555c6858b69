"""Ship a finished run in the ecosystem's formats: ``tunelab merge`` (the adapter folded into
its base: a Hugging Face model folder that loads without tunelab) and ``tunelab export``
(``safetensors``: the same; ``peft``: the adapter alone; ``gguf``: one llama.cpp file, see
:mod:`tunelab.models.gguf`). Everything is written aside and renamed into place: an
interrupted export leaves no half-written folder or file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunelab.config.load import load_config
from tunelab.errors import ConfigError, ModelError
from tunelab.files import atomic_folder, atomic_path, atomic_write_json
from tunelab.models.load import (
    ADAPTER_CONFIG,
    RUN_CONFIG,
    load_model,
    resolve_model,
    run_adapter,
    run_final,
)
from tunelab.models.methods import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "peft", "gguf")
MERGED_FROM = "tunelab_merged_from.json"  # provenance beside the merged weights


def check_run(run: Path) -> Path:
    """``run`` as a finished run folder, or a clear error."""
    run = Path(run)
    if not (run / RUN_CONFIG).is_file():
        raise ModelError(f"{run}: not a tunelab run folder (no {RUN_CONFIG})")
    run_final(run)  # an unfinished run: named, before anything loads
    return run


def check_out(out: Path, *, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: already exists (choose another path, or --force to replace it)"
        )


def merged_model(run: Path, dtype: str | None = None):
    """(model, tokenizer, notes): the run's weights as one plain transformers model on the CPU —
    an adapter merged into its base in fp32, then cast to ``dtype`` (default: the base's)."""
    notes = []
    adapter = run_adapter(str(run))
    model, tokenizer = load_model(str(run), dtype=torch.float32, device="cpu")
    cfg = load_config(run / RUN_CONFIG)
    if adapter is not None and get_method(cfg.method).quantize_bits:
        notes.append(
            "this adapter was trained on a 4-bit base: it is merged into the full-precision base, "
            "so the merged model's logits differ from the training-time model's by the base's "
            "quantisation error (compare with `tunelab eval` before shipping)"
        )
    target = dtype or _config_dtype(model.config)
    if target not in DTYPES:
        raise ConfigError(f"--dtype {target}: expected one of {', '.join(DTYPES)}")
    return model.to(DTYPES[target]).eval(), tokenizer, notes


def _config_dtype(config) -> str:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def merge(run: Path, out: Path, *, dtype: str | None = None, force: bool = False) -> list[str]:
    """Write the run's model as a Hugging Face model folder (safetensors, config, generation
    config, tokenizer with its chat template) at ``out``; returns notes worth telling."""
    run = check_run(run)
    check_out(out, force=force)
    model, tokenizer, notes = merged_model(run, dtype)
    adapter = run_adapter(str(run))
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MERGED_FROM, {
            "run": str(run.resolve()), "base": adapter[0] if adapter else None,
            "adapter_merged": adapter is not None, "dtype": str(model.dtype).removeprefix("torch."),
        })  # fmt: skip
    return notes


def export_peft(run: Path, out: Path, *, force: bool = False) -> None:
    """The adapter alone, as PEFT saves it (``PeftModel.from_pretrained(base, out)``), with the
    tokenizer it was trained with."""
    run = check_run(run)
    final = run_final(run)
    if not (final / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"{run}: a full fine-tune has no adapter to export (use --format safetensors)"
        )
    check_out(out, force=force)
    base = load_config(run / RUN_CONFIG).model.name
    with atomic_folder(out) as tmp:
        for f in final.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base  # as the user named it, not a cache path
        atomic_write_json(tmp / ADAPTER_CONFIG, config)


def export_gguf(run: Path, out: Path, *, dtype: str = "f16", force: bool = False) -> list[str]:
    """One GGUF file (llama.cpp): merged weights in ``dtype`` (f32, f16, q8_0), metadata,
    tokenizer and chat template."""
    from tunelab.models.gguf import GGUF_DTYPES, source_pre, write_gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype {dtype}: GGUF export writes one of {', '.join(GGUF_DTYPES)}")
    run = check_run(run)
    if out.exists() and not force:
        raise ConfigError(
            f"--out {out}: already exists (choose another path, or --force to replace it)"
        )
    model, tokenizer, notes = merged_model(run, "float32")
    base = run_adapter(str(run))
    origin = resolve_model(base[0] if base else str(run))
    pre = source_pre(origin) if isinstance(origin, Path) else "default"
    with atomic_path(out) as tmp:
        write_gguf(model, tokenizer, tmp, dtype=dtype, name=run.name, pre=pre)
    return notes
