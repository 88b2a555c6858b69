"""``tunelab merge`` and ``tunelab export``: a finished run in the ecosystem's formats."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape


def merge(
    run: Path = typer.Argument(..., help="A finished run folder."),
    out: Path | None = typer.Option(
        None, "--out", help="The model folder to write (default RUN/merged)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 | bfloat16 | float16 (default: the base's)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Fold the adapter into its base: a Hugging Face model folder any transformers loads."""
    from tunelab.workflow.ship import merge as merge_run

    out = out or run / "merged"
    notes = merge_run(run, out, dtype=dtype, force=force)
    _done(out, notes, f"AutoModelForCausalLM.from_pretrained({str(out)!r})")


def export(
    run: Path = typer.Argument(..., help="A finished run folder."),
    fmt: str = typer.Option(
        "gguf", "--format", help="gguf | safetensors (merged) | peft (the adapter alone)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write (default: inside the run folder)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="gguf: f32 | f16 | q8_0 (default f16); safetensors: as merge."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Export a finished run: one GGUF file for llama.cpp, a merged model folder, or the adapter."""
    from tunelab.errors import ConfigError
    from tunelab.workflow.ship import FORMATS, export_gguf, export_peft
    from tunelab.workflow.ship import merge as merge_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    notes: list[str] = []
    if fmt == "gguf":
        dtype = dtype or "f16"
        out = out or run / f"{run.resolve().name}-{dtype}.gguf"
        notes = export_gguf(run, out, dtype=dtype, force=force)
        how = f"llama.cpp: llama-cli -m {out}"
    elif fmt == "peft":
        out = out or run / "adapter"
        export_peft(run, out, force=force)
        how = f"PeftModel.from_pretrained(base_model, {str(out)!r})"
    else:
        out = out or run / "merged"
        notes = merge_run(run, out, dtype=dtype, force=force)
        how = f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    _done(out, notes, how)


def _done(out: Path, notes: list[str], how: str) -> None:
    console = Console(highlight=False, soft_wrap=True)
    for note in notes:
        console.print(f"[yellow]note[/]: {escape(note)}")
    console.print(f"written: {escape(str(out))}\nload it with: {escape(how)}")
