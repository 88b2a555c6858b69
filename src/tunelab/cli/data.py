"""``tunelab data``: check, split and preview data files."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from tunelab.cli.progress import counting_bar
from tunelab.config.load import flag_overrides, load_config
from tunelab.config.schema import DataConfig

app = typer.Typer(help="Check, split and preview data files.", no_args_is_help=True)

_CONFIG = typer.Option(
    None, "--config", "-c", help="Read data settings (format, columns, ...) from this YAML config."
)
_FORMAT = typer.Option(
    None, "--format", help="Force a record format: alpaca, chat, preference, kto, text."
)


def _data_config(config: Path | None, overrides: list[str] | None = None, **flags) -> DataConfig:
    """The config's data section, with command-line flags (when given) and then dotted
    ``overrides`` on top, validated."""
    return load_config(config, flag_overrides("data", **flags) + list(overrides or [])).data


def _tokenize(examples, model: str, cfg: DataConfig, console: Console, quiet: bool):
    from tunelab.data.pipeline import tokenize_examples
    from tunelab.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    with counting_bar(console, quiet) as progress:
        task = progress.add_task("tokenizing", total=len(examples))
        report = tokenize_examples(examples, tokenizer, cfg, lambda n: progress.advance(task, n))
    return tokenizer, report


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="A .jsonl, .json (array) or .csv data file."),
    eval_file: Path | None = typer.Option(
        None, "--eval", help="A held-out file: count its overlap with FILE."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Count tokens with this model's tokenizer."
    ),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Sequence limit (default 1024)."
    ),
    truncation: str | None = typer.Option(
        None, "--truncation", help="drop | truncate_prompt | truncate | error"
    ),
    format: str | None = _FORMAT,
    config: Path | None = _CONFIG,
    diversity_threshold: float | None = typer.Option(
        None,
        "--diversity-threshold",
        help="Warn when one instruction covers more than this share (data.diversity_threshold, default 0.5).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON to stdout."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit with code 1 when there are warnings."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Validate every record and print statistics.

    Formats, token lengths against max_seq_len and what truncation does, duplicates,
    instruction diversity, and overlap with an eval file.
    """
    from tunelab.data.pipeline import load_examples
    from tunelab.data.stats import compute_overlap, compute_stats, render_stats

    cfg = _data_config(
        config, max_seq_len=max_seq_len, truncation=truncation, format=format,
        diversity_threshold=diversity_threshold,
    )  # fmt: skip
    console = Console(stderr=as_json, highlight=False)
    examples = load_examples(file, cfg)
    other = load_examples(eval_file, cfg) if eval_file else None
    report = None
    if model:
        # Checking never fails on an over-long record: it reports what the policy would do.
        policy = "drop" if cfg.truncation == "error" else cfg.truncation
        _, report = _tokenize(
            examples,
            model,
            cfg.model_copy(update={"truncation": policy}),
            console,
            quiet or as_json,
        )
    stats = compute_stats(
        examples, report, max_seq_len=cfg.max_seq_len, truncation=cfg.truncation,
        diversity_threshold=cfg.diversity_threshold,
    )  # fmt: skip
    overlap = compute_overlap(examples, other) if other is not None else None
    if as_json:
        out = {"file": str(file), **stats.to_dict()}
        if overlap is not None:
            out["overlap"] = {"file": str(eval_file), **overlap.to_dict()}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        render_stats(stats, overlap, console, title=str(file))
    if strict and stats.warnings:
        raise typer.Exit(1)


@app.command("split")
def split(
    file: Path = typer.Argument(..., help="The data file to split."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. data.split_ratios=[0.8,0.2]."
    ),
    ratios: str | None = typer.Option(
        None,
        "--ratios",
        help="Shares of train,val,test, two or three numbers (data.split_ratios, default 0.7,0.15,0.15).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Same seed, same split, on any machine (data.seed, default 42)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: next to FILE)."
    ),
    dedup: bool | None = typer.Option(None, "--dedup", help="Drop exact duplicates first."),
    format: str | None = _FORMAT,
    config: Path | None = _CONFIG,
) -> None:
    """Split a file into train/val/test JSONL files, deterministically.

    Records with the same (normalised) prompt always land in the same split: no leakage.
    """
    from tunelab.data.pipeline import dedup as drop_duplicates
    from tunelab.data.read import read_rows
    from tunelab.data.records import parse_examples
    from tunelab.data.split import split_indices, write_jsonl_atomic_many
    from tunelab.errors import ConfigError

    shares = None
    if ratios is not None:
        try:
            shares = [float(x) for x in ratios.split(",")]
        except ValueError:
            raise ConfigError(
                f"--ratios {ratios!r}: expected comma-separated numbers, e.g. 0.7,0.15,0.15"
            ) from None
    cfg = _data_config(
        config, overrides, format=format, dedup=dedup, split_ratios=shares, seed=seed
    )
    rows = read_rows(file)  # read once: the examples to split, and the original rows to write
    examples = parse_examples(
        rows, format=cfg.format, columns=cfg.columns, system_prompt=cfg.system_prompt
    )
    if cfg.dedup:
        kept = drop_duplicates(examples)
        print(f"dropped {len(examples) - len(kept)} exact duplicate(s)")
        keep = {id(ex) for ex in kept}
        rows = [r for r, ex in zip(rows, examples, strict=True) if id(ex) in keep]
        examples = kept
    parts = split_indices(examples, cfg.split_ratios, cfg.seed)
    names = ("train", "val", "test")[: len(cfg.split_ratios)]
    folder = out or file.parent / f"{file.stem}_split"
    targets = [folder / f"{name}.jsonl" for name in names]
    write_jsonl_atomic_many(
        [(path, [rows[i].fields for i in idx]) for path, idx in zip(targets, parts, strict=True)]
    )
    for path, idx in zip(targets, parts, strict=True):
        print(f"{path}: {len(idx)} records")


@app.command("preview")
def preview(
    file: Path = typer.Argument(..., help="A data file."),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", "-m", help="Tokenizer to render with."
    ),
    n: int = typer.Option(1, "-n", help="How many records to show."),
    format: str | None = _FORMAT,
    config: Path | None = _CONFIG,
) -> None:
    """Show records as the model sees them, coloured by loss weight.

    Response tokens (weight 1) green, prompt tokens (prompt_loss_weight) dim, weight 0 struck.
    """
    from tunelab.data.pipeline import load_examples

    cfg = _data_config(config, format=format)
    console = Console(highlight=False)
    examples = load_examples(file, cfg)[:n]
    tokenizer, report = _tokenize(examples, model, cfg, console, True)
    for tex in report.examples:
        console.rule(
            f"{tex.example.source}  ({len(tex.seq)} tokens, prompt_loss_weight {cfg.prompt_loss_weight})"
        )
        console.print(_colour(tokenizer, tex.seq))
        if tex.rejected is not None:
            console.rule("rejected")
            console.print(_colour(tokenizer, tex.rejected))


def _colour(tokenizer, seq) -> Text:
    text = Text()
    for tid, w in zip(seq.input_ids.tolist(), seq.weights.tolist(), strict=True):
        piece = tokenizer.decode([tid])
        style = "bold green" if w == 1.0 else ("strike dim" if w == 0.0 else "dim")
        text.append(piece, style=style)
    return text
