"""The data path in two calls: file -> examples, examples -> tokenized examples.

Everything that reads data (``tunelab data check``, ``data split``, training) goes through
these, so a record means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tunelab.config.schema import DataConfig
from tunelab.data.read import read_rows
from tunelab.data.records import Example, parse_examples
from tunelab.data.render import ensure_chat_template
from tunelab.data.tokenize import EncodeOptions, EncodeReport, encode


def load_examples(path: str | Path, cfg: DataConfig) -> list[Example]:
    """Read and validate every record of a file (raises DataError listing the bad rows)."""
    rows = read_rows(path)
    examples = parse_examples(
        rows, format=cfg.format, columns=cfg.columns, system_prompt=cfg.system_prompt
    )
    return dedup(examples) if cfg.dedup else examples


def dedup(examples: Sequence[Example]) -> list[Example]:
    """Keep the first of each group of exact duplicates (same prompt, response and format)."""
    seen: set[tuple] = set()
    kept = []
    for ex in examples:
        if ex.identity not in seen:
            seen.add(ex.identity)
            kept.append(ex)
    return kept


def encode_options(cfg: DataConfig) -> EncodeOptions:
    return EncodeOptions(
        prompt_loss_weight=cfg.prompt_loss_weight,
        train_on=cfg.train_on,
        max_seq_len=cfg.max_seq_len,
        truncation=cfg.truncation,
    )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    cfg: DataConfig,
    on_progress: Callable[[int], None] | None = None,
) -> EncodeReport:
    ensure_chat_template(tokenizer, cfg.chat_template)
    return encode(examples, tokenizer, encode_options(cfg), on_progress=on_progress)
