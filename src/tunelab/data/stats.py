"""Dataset statistics for ``tunelab data check``.

Token lengths against ``max_seq_len`` (exact when a tokenizer encoded the data, otherwise
estimated as ceil(chars / 4)), what the truncation policy does to over-long records, exact and
near duplicates, how repetitive the instructions are, and train/eval overlap.

A model trained on one fixed instruction learns that phrase rather than the task, so the
diversity check warns when one instruction (or one opening) dominates the data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tunelab.data.records import Example
from tunelab.data.split import normalize
from tunelab.data.tokenize import EncodeReport

if TYPE_CHECKING:
    from rich.console import Console

MIN_RECORDS_FOR_DIVERSITY = 10
OPENING_WORDS = 3
SHOW_CHARS = 80
MAX_OVERLAP_EXAMPLES = 5

#: What each truncation policy does with a record longer than max_seq_len.
POLICY_EFFECT = {
    "drop": "be dropped",
    "truncate": "be cut at the limit (the end of the response is lost)",
    "truncate_prompt": "have their prompt cut from the left",
    "error": "stop the run with an error",
}


@dataclass
class Diversity:
    distinct_instructions: int = 0
    distinct_ratio: float = 0.0
    top_instruction: str = ""
    top_instruction_share: float = 0.0
    top_opening: str = ""
    top_opening_share: float = 0.0
    warning: str | None = None


@dataclass
class Preferences:
    """What preference and KTO data need checking beyond the rest."""

    pairs: int = 0  # preference records
    chosen_longer: float | None = None  # share of pairs whose chosen answer is longer (characters)
    chosen_chars: float | None = None  # mean length of the chosen answers
    rejected_chars: float | None = None  # mean length of the rejected answers
    desirable: int = 0  # KTO records tagged true
    undesirable: int = 0  # KTO records tagged false


#: Share of pairs with the longer answer chosen above which (or below 1 minus which) a
#: preference objective can learn "longer is better" instead of the preference.
LENGTH_BIAS = 0.7


@dataclass
class DataStats:
    records: int
    formats: dict[str, int]
    lengths_exact: bool
    length: dict[str, float]  # min, median, p95, max, mean (tokens)
    max_seq_len: int | None
    truncation: str
    over_limit: int
    truncated: int
    dropped: dict[str, int]  # reason -> count
    kept: int
    exact_duplicates: int
    near_duplicate_instructions: int
    diversity: Diversity
    preferences: Preferences = field(default_factory=Preferences)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Overlap:
    other_records: int
    exact: int  # same prompt and response as a training record
    same_prompt: int  # same normalised prompt as a training record
    examples: list[str] = field(default_factory=list)  # "file:line" of overlapping records

    def to_dict(self) -> dict:
        return asdict(self)


# -- statistics --------------------------------------------------------------------------------
def compute_stats(
    examples: Sequence[Example],
    report: EncodeReport | None,
    *,
    max_seq_len: int | None,
    truncation: str,
    diversity_threshold: float = 0.5,
) -> DataStats:
    """Statistics of ``examples``; ``report`` (from ``encode``) gives exact token lengths."""
    n = len(examples)
    if report is not None:
        if len(report.lengths) != n:
            raise ValueError(
                f"the encode report has {len(report.lengths)} lengths for {n} examples"
            )
        lengths = np.asarray(report.lengths, dtype=np.int64)
    else:
        lengths = np.fromiter((_estimate(_chars(ex)) for ex in examples), np.int64, count=n)
    over = (
        np.flatnonzero(lengths > max_seq_len) if max_seq_len is not None else np.empty(0, np.int64)
    )
    if report is not None:
        truncated, dropped, kept = report.truncated, dict(report.dropped), len(report.examples)
        if truncation == "error" and max_seq_len is not None:
            # Checking encodes with "drop" so it can count; under "error" nothing is dropped.
            dropped.pop(drop_reason(max_seq_len), None)
            kept = n - sum(dropped.values())
    else:
        truncated, dropped = _estimate_policy([examples[i] for i in over], max_seq_len, truncation)
        kept = n - sum(dropped.values())
    instructions = [ex.instruction for ex in examples]
    normalised = [normalize(text, digits=False) for text in instructions]
    exact, near = _duplicates(examples, normalised)
    diversity = _diversity(examples, instructions, normalised, diversity_threshold)
    stats = DataStats(
        records=n,
        formats=dict(Counter(ex.format for ex in examples).most_common()),
        lengths_exact=report is not None,
        length=_summary(lengths),
        max_seq_len=max_seq_len,
        truncation=truncation,
        over_limit=len(over),
        truncated=truncated,
        dropped=dropped,
        kept=kept,
        exact_duplicates=exact,
        near_duplicate_instructions=near,
        diversity=diversity,
        preferences=_preferences(examples),
    )
    stats.warnings = _warnings(stats)
    return stats


def _preferences(examples: Sequence[Example]) -> Preferences:
    pairs = [ex for ex in examples if ex.format == "preference"]
    tags = [ex.label for ex in examples if ex.format == "kto"]
    out = Preferences(pairs=len(pairs), desirable=sum(tags), undesirable=len(tags) - sum(tags))
    if pairs:
        chosen = np.array([len(ex.chosen or "") for ex in pairs], dtype=np.float64)
        rejected = np.array([len(ex.rejected or "") for ex in pairs], dtype=np.float64)
        out.chosen_longer = round(float((chosen > rejected).mean()), 4)
        out.chosen_chars = round(float(chosen.mean()), 1)
        out.rejected_chars = round(float(rejected.mean()), 1)
    return out


def _preference_warnings(p: Preferences) -> list[str]:
    out = []
    biased = p.chosen_longer is not None and not (1 - LENGTH_BIAS < p.chosen_longer < LENGTH_BIAS)
    if biased:
        side = "longer" if p.chosen_longer >= LENGTH_BIAS else "shorter"
        share = p.chosen_longer if side == "longer" else 1 - p.chosen_longer
        out.append(
            f"length bias: the chosen answer is the {side} one in {share:.0%} of pairs "
            f"({p.chosen_chars:g} vs {p.rejected_chars:g} characters on average); a preference "
            f"objective can learn to prefer {side} answers instead of better ones — add pairs "
            "where the better answer is the other length, or use a length-normalised "
            "objective (SimPO)"
        )
    kto = p.desirable + p.undesirable
    if kto and not (p.desirable and p.undesirable):
        missing = "undesirable (kto_tag false)" if p.desirable else "desirable (kto_tag true)"
        out.append(f"KTO data with no {missing} examples: KTO learns from both kinds; add some")
    elif kto:
        ratio = p.desirable / p.undesirable
        if not 1 <= ratio <= 4 / 3:
            fix = (f"desirable_weight {1 / ratio:.2f}" if ratio < 1
                   else f"undesirable_weight {ratio:.2f}")  # fmt: skip
            out.append(
                f"KTO balance: {p.desirable} desirable vs {p.undesirable} undesirable examples "
                f"({ratio:.2f}:1); the KTO paper keeps desirable_weight x desirable / "
                f"(undesirable_weight x undesirable) between 1 and 4/3 (e.g. {fix})"
            )
    return out


def compute_overlap(train: Sequence[Example], other: Sequence[Example]) -> Overlap:
    """How many records of ``other`` (val/test/eval) also occur in ``train``."""
    pairs = {(ex.prompt_key, ex.response) for ex in train}
    prompts = {normalize(ex.prompt_key) for ex in train}
    exact = same = 0
    shown: list[str] = []
    for ex in other:
        is_exact = (ex.prompt_key, ex.response) in pairs
        if is_exact or normalize(ex.prompt_key) in prompts:
            exact += is_exact
            same += 1
            if len(shown) < MAX_OVERLAP_EXAMPLES:
                shown.append(str(ex.source))
    return Overlap(other_records=len(other), exact=exact, same_prompt=same, examples=shown)


def _chars(ex: Example) -> int:
    """Characters of one sequence: the conversation, plus the longer of chosen/rejected."""
    n = sum(len(m.content) for m in ex.messages) + len(ex.text or "")
    return n + max(len(ex.chosen or ""), len(ex.rejected or ""))


def _estimate(chars: int) -> int:
    return -(-chars // 4)


def _split_chars(ex: Example) -> tuple[int, int]:
    """(prompt chars before the first trained reply, chars from it to the end)."""
    if ex.format == "text":
        return 0, len(ex.text or "")
    if ex.format == "preference":
        return sum(len(m.content) for m in ex.messages), max(
            len(ex.chosen or ""), len(ex.rejected or "")
        )
    first = next((i for i, m in enumerate(ex.messages) if m.role == "assistant"), len(ex.messages))
    return (
        sum(len(m.content) for m in ex.messages[:first]),
        sum(len(m.content) for m in ex.messages[first:]),
    )


def _estimate_policy(
    over: list[Example], limit: int | None, policy: str
) -> tuple[int, dict[str, int]]:
    """(truncated, dropped by reason) for over-long records, mirroring ``tokenize._truncate``."""
    if limit is None or not over or policy == "error":
        return 0, {}
    if policy == "drop":
        return 0, {drop_reason(limit): len(over)}
    dropped = 0
    for ex in over:
        prompt, reply = (_estimate(c) for c in _split_chars(ex))
        dropped += prompt >= limit if policy == "truncate" else reply > limit
    if policy == "truncate":
        why = f"have no trained token left after truncating to {limit} (truncation: truncate)"
    else:
        why = f"have a response longer than max_seq_len {limit} (truncation: truncate_prompt)"
    return len(over) - dropped, ({why: dropped} if dropped else {})


def drop_reason(limit: int) -> str:
    """The reason ``encode`` gives for records dropped by ``truncation: drop``."""
    return f"are longer than max_seq_len {limit} (truncation: drop)"


def _summary(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"min": 0, "median": 0.0, "p95": 0.0, "max": 0, "mean": 0.0}
    median, p95 = np.percentile(lengths, [50, 95])
    return {
        "min": int(lengths.min()),
        "median": round(float(median), 1),
        "p95": round(float(p95), 1),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }


def _duplicates(examples: Sequence[Example], normalised: list[str]) -> tuple[int, int]:
    """(exact repeats of an earlier record, near-duplicate instructions that are not exact)."""
    seen: set[tuple] = set()
    seen_instructions: set[str] = set()
    exact = near = 0
    for ex, instruction in zip(examples, normalised, strict=True):
        key = ex.identity
        if key in seen:
            exact += 1
        else:
            seen.add(key)
            near += instruction in seen_instructions
        seen_instructions.add(instruction)
    return exact, near


def _diversity(
    examples: Sequence[Example], instructions: list[str], normalised: list[str], threshold: float
) -> Diversity:
    """Instruction variety over records that have one (``text`` records have none).

    An alpaca/kto instruction is cut at the first blank line (where ``input`` starts), so a
    fixed instruction with varying inputs still counts as one instruction."""
    heads: list[str] = []
    keys: list[str] = []
    for ex, text, norm in zip(examples, instructions, normalised, strict=True):
        if ex.format == "text":
            continue
        if ex.format in ("alpaca", "kto") and "\n\n" in text:
            text = text.split("\n\n", 1)[0]
            norm = normalize(text, digits=False)
        heads.append(text)
        keys.append(norm)
    if not heads:
        return Diversity()
    n = len(heads)
    counts = Counter(keys)
    top, top_n = counts.most_common(1)[0]
    openings = Counter(" ".join(k.split(" ", OPENING_WORDS)[:OPENING_WORDS]) for k in keys)
    opening, opening_n = openings.most_common(1)[0]
    shown = _clip(heads[keys.index(top)])
    div = Diversity(
        distinct_instructions=len(counts),
        distinct_ratio=round(len(counts) / n, 4),
        top_instruction=shown,
        top_instruction_share=round(top_n / n, 4),
        top_opening=opening,
        top_opening_share=round(opening_n / n, 4),
    )
    if n >= MIN_RECORDS_FOR_DIVERSITY:
        why = (
            "a model trained on one fixed instruction learns that phrase rather than the task "
            "and tends to fail when the request is worded differently; paraphrase the "
            "instructions, or move the fixed part into the system prompt"
        )
        if top_n / n > threshold:
            div.warning = (
                f"{top_n / n:.0%} of records ({top_n} of {n}) use the same instruction "
                f'"{shown}": {why}'
            )
        elif opening_n / n > threshold:
            div.warning = (
                f"{opening_n / n:.0%} of instructions ({opening_n} of {n}) start with "
                f'"{opening}": {why}'
            )
    return div


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 1] + "…"


def _warnings(s: DataStats) -> list[str]:
    out: list[str] = []
    est = "" if s.lengths_exact else " (by the chars/4 estimate; pass --model for exact counts)"
    if s.over_limit and s.max_seq_len is not None:
        out.append(
            f"{_records(s.over_limit)} {'exceeds' if s.over_limit == 1 else 'exceed'} "
            f"max_seq_len {s.max_seq_len}{est} and will "
            f"{POLICY_EFFECT.get(s.truncation, s.truncation)} (truncation: {s.truncation})"
        )
    for reason, count in s.dropped.items():
        if s.max_seq_len is not None and reason == drop_reason(s.max_seq_len):
            continue  # said above
        out.append(f"{count} record(s) {reason} and will be dropped")  # encode's plural wording
    if s.exact_duplicates:
        out.append(
            f"{_records(s.exact_duplicates)} "
            f"{'repeats' if s.exact_duplicates == 1 else 'repeat'} an earlier record exactly (same "
            "prompt and response); repeats weigh more in training, so remove them unless intended"
        )
    if s.diversity.warning:
        out.append(s.diversity.warning)
    return out + _preference_warnings(s.preferences)


def _records(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"


# -- rendering ---------------------------------------------------------------------------------
def render_stats(
    stats: DataStats, overlap: Overlap | None, console: Console, *, title: str
) -> None:
    """Print a compact report: formats, lengths, limit, duplicates, diversity, overlap, warnings."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(title)}[/bold]: {stats.records} records")
    formats = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    formats.add_column("format")
    formats.add_column("records", justify="right")
    for name, count in stats.formats.items():
        formats.add_row(name, str(count))
    console.print(formats)

    heading = (
        "token lengths"
        if stats.lengths_exact
        else "token lengths (≈ chars/4; pass --model for exact counts)"
    )
    console.print(heading)
    lengths = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for key in ("min", "median", "p95", "max", "mean"):
        lengths.add_column(key, justify="right")
    lengths.add_row(*(f"{stats.length[k]:g}" for k in ("min", "median", "p95", "max", "mean")))
    console.print(lengths)

    if stats.max_seq_len is not None:
        effect = POLICY_EFFECT.get(stats.truncation, stats.truncation)
        line = (
            f"max_seq_len {stats.max_seq_len}, truncation: {stats.truncation} (over-long records "
            f"will {effect}): {stats.over_limit} over the limit; {stats.kept} kept, "
            f"{stats.truncated} truncated, {sum(stats.dropped.values())} dropped"
        )
        console.print(escape(line + ("" if stats.lengths_exact else " (estimated)")))
    console.print(
        f"duplicates: {stats.exact_duplicates} exact, "
        f"{stats.near_duplicate_instructions} near-duplicate instructions"
    )
    d = stats.diversity
    if d.distinct_instructions:
        console.print(
            f"diversity: {d.distinct_instructions} distinct instructions ({d.distinct_ratio:.0%}); "
            f'most common {d.top_instruction_share:.0%} "{escape(d.top_instruction)}"; '
            f'most common opening {d.top_opening_share:.0%} "{escape(d.top_opening)}"'
        )
    p = stats.preferences
    if p.pairs:
        console.print(
            f"preference pairs: {p.pairs}; the chosen answer is the longer one in "
            f"{p.chosen_longer:.0%} ({p.chosen_chars:g} vs {p.rejected_chars:g} characters on average)"
        )
    if p.desirable + p.undesirable:
        console.print(f"KTO: {p.desirable} desirable, {p.undesirable} undesirable")
    if overlap is not None:
        where = f" (e.g. {', '.join(overlap.examples)})" if overlap.examples else ""
        console.print(
            f"overlap with training data: {overlap.exact} of {overlap.other_records} exact, "
            f"{overlap.same_prompt} with the same prompt{escape(where)}",
            style="red" if overlap.same_prompt else None,
        )
    for w in stats.warnings:
        console.print(f"warning: {escape(w)}", style="yellow")
