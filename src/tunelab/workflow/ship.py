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
from tunelab.models.device import frozen_dtype
from tunelab.models.load import (
    ADAPTER_CONFIG,
    RUN_CONFIG,
    load_model,
    load_model_config,
    resolve_model,
    run_adapter,
    run_final,
)
from tunelab.models.methods import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "peft", "gguf")
MERGED_FROM = "tunelab_merged_from.json"  # provenance beside the merged weights
PROBE = "A probe for the merge check: the quick brown fox jumps over the lazy dog, 1 2 3."
MERGE_TOLERANCE = 1e-4  # merged vs unmerged on the same base, × the logits' std


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
    an adapter merged into its base in fp32 (a QLoRA adapter into its de-quantised base), then
    cast to ``dtype`` (default: the base's)."""
    adapter = run_adapter(str(run))
    bits = get_method(load_config(run / RUN_CONFIG).method).quantize_bits
    if adapter is not None and bits:
        model, tokenizer, notes = _qlora_merged(run, *adapter, bits=bits)
    else:
        model, tokenizer = load_model(str(run), dtype=torch.float32, device="cpu")
        notes = []
    target = dtype or _saved_dtype(run)
    if target not in DTYPES:
        raise ConfigError(f"--dtype {target}: expected one of {', '.join(DTYPES)}")
    return model.to(DTYPES[target]).eval(), tokenizer, notes


def _qlora_merged(run: Path, base: str, adapter: Path, *, bits: int):
    """A QLoRA adapter folded into the base it was trained on: the base quantised as training
    loaded it, then de-quantised to fp32 — not the original weights, which differ from those by
    the quantisation error the adapter never saw. Checked on a probe: merged vs the adapter on
    the de-quantised base (must agree: merging is exact) and vs the adapter on the quantised
    base (the training-time model: differs by the quantised matmuls' rounding)."""
    from peft import PeftModel

    from tunelab.models.load import load_quantized
    from tunelab.models.methods.lora import merge_and_unload
    from tunelab.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(str(run)))
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    dtype = _trained_dtype(run)
    model = PeftModel.from_pretrained(load_quantized(base, bits, dtype=dtype), adapter).eval()
    on_quantized = _probe(model, ids)
    del model  # loaded again rather than unloaded: PEFT's unload() leaves a 4-bit model that
    # de-quantises wrongly (peft 0.21, bitsandbytes 0.50)
    plain = load_quantized(base, bits, dtype=dtype).dequantize().float()
    model = PeftModel.from_pretrained(plain, adapter).eval()
    unmerged = _probe(model, ids)
    model = merge_and_unload(model)
    scale = unmerged.std().item()
    exact = (_probe(model, ids) - unmerged).abs().max().item() / scale
    drift = (on_quantized - unmerged).abs().max().item() / scale
    if exact > MERGE_TOLERANCE:
        raise ModelError(f"{run}: the merged model's logits differ from the adapter's on the "
                         f"de-quantised base by {exact:.1e} × their spread: not writing it")  # fmt: skip
    return model, tokenizer, [
        f"QLoRA run: the adapter is merged into the {bits}-bit base de-quantised to fp32 (the "
        "weights training computed with), not into the original weights, which differ from them "
        "by the quantisation error the adapter never saw. Check on a "
        f"{ids.shape[1]}-token probe, max |Δlogit| / the logits' std: merged vs the adapter on "
        f"the de-quantised base {exact:.1e} (merging is exact), vs the adapter on the {bits}-bit "
        f"base {drift:.1e} (the {bits}-bit matmuls' rounding)"
    ]  # fmt: skip


def _probe(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _trained_dtype(run: Path) -> torch.dtype:
    """The dtype the run's frozen base was loaded in (and so quantised from)."""
    result = run / "result.json"
    info = json.loads(result.read_text()) if result.is_file() else {}
    return frozen_dtype(info.get("precision", "fp32"))


def _saved_dtype(run: Path) -> str:
    """The dtype the run's model folder (an adapter's base, or the full fine-tune) was saved in."""
    config = load_model_config(str(run))
    value = config.get("dtype") or config.get("torch_dtype")
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
