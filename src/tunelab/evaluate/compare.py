"""``tunelab compare A B C ...``: every metric of several evaluations side by side.

    eval/<name>/{metrics.json, predictions.jsonl}  -> load_eval -> EvalRun
    runs -> align examples by content (alignment_keys) -> refuse different references
    -> per metric: each run's mean over the common examples, the difference to the baseline
    with a paired-bootstrap interval, flips
    -> the most instructive examples (fixed and broken by the best run)
    -> format_table (terminal), write_report (compare.md + compare.html)

The first evaluation is the baseline (usually the base model zero-shot). Differences are
paired: the same examples, resampled together, so an example that every run gets right or
wrong adds no noise to the interval.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.data.read import read_text
from tunelab.errors import ConfigError, DataError, Problem
from tunelab.files import atomic_write_text, read_jsonl

#: Which per-example metric picks the instructive examples and the best run, first present wins.
MAIN_METRICS = ("task", "json_equal", "exact_match", "preference_accuracy", "judge", "rougeL",
                "bleu", "rouge1", "rouge2")  # fmt: skip
#: Right-or-wrong metrics: flips are counted for these when every score is 0 or 1.
FLIP_METRICS = ("exact_match", "json_equal", "task", "preference_accuracy")
#: Table order; other metrics follow alphabetically.
ORDER = ("exact_match", "json_equal", "task", "judge", "bleu", "rouge1", "rouge2", "rougeL")
#: Metrics shown with two decimals (not on a 0-1 scale).
WIDE = ("bleu", "bleu (corpus)", "judge", "loss", "perplexity")
#: Metrics drawn in the bar chart (all on a 0-1 scale).
CHARTED = ("exact_match", "json_equal", "task", "rouge1", "rouge2", "rougeL")


@dataclass
class EvalRun:
    """One evaluation folder: ``meta`` is metrics.json, ``records`` predictions.jsonl."""

    name: str
    meta: dict
    records: list[dict]
    folder: Path | None = None


@dataclass(frozen=True)
class Delta:
    """``mean`` = mean(run) - mean(baseline) over paired examples, with its interval."""

    mean: float
    lo: float
    hi: float
    right_to_wrong: int | None = None  # flips, for right-or-wrong metrics
    wrong_to_right: int | None = None

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.lo > 0 or self.hi < 0


@dataclass
class MetricRow:
    metric: str
    values: list[float | None]  # one per run; None: the run has no such metric
    deltas: list[Delta | None]  # one per run; None for the baseline and summary-only rows
    n: int | None  # examples behind the values; None: each run's own summary (metrics.json)


@dataclass
class Example:
    source: str
    index: int
    prompt: str
    reference: str
    predictions: list[str]  # one per run
    scores: list[float]  # the main metric, one per run


@dataclass
class Comparison:
    runs: list[EvalRun]
    baseline_index: int
    rows: list[MetricRow]
    aligned: int  # examples every run has
    dropped: list[int]  # per run: its examples left out because another run lacks them
    main_metric: str | None
    best_index: int | None  # the non-baseline run best on the main metric
    fixed: list[Example] = field(default_factory=list)  # baseline wrong, best right
    broken: list[Example] = field(default_factory=list)  # baseline right, best wrong
    notes: list[str] = field(default_factory=list)
    confidence: float = 0.95
    resamples: int = 10000


# --- statistics ------------------------------------------------------------------------------


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(mean(b) - mean(a), lo, hi)``: the observed difference over paired examples and its
    percentile bootstrap interval. Each resample draws n examples with replacement (the same
    draw for ``a`` and ``b``) and takes the mean difference; ``lo``/``hi`` are the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means.
    Deterministic for a seed."""
    if np.ndim(a) != 1 or np.shape(a) != np.shape(b):
        raise ValueError(
            f"paired scores must be two 1-D sequences of one length, got {np.shape(a)} and {np.shape(b)}"
        )
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    if n == 0 or resamples < 1 or not 0 < confidence < 1:
        raise ValueError("need at least one pair, one resample, and 0 < confidence < 1")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, 2**22 // n)  # about 32 MiB of indices at a time
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(lo), float(hi)


def flips(a: Sequence[float], b: Sequence[float], *, threshold: float = 0.5) -> tuple[int, int]:
    """``(right -> wrong, wrong -> right)`` from ``a`` to ``b``; a score >= threshold is right."""
    ra = np.asarray(a, dtype=float) >= threshold
    rb = np.asarray(b, dtype=float) >= threshold
    return int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))


# --- reading ---------------------------------------------------------------------------------


def load_eval(folder: str | Path) -> EvalRun:
    """Read ``folder/metrics.json`` and ``folder/predictions.jsonl``; a missing or malformed
    file is a :class:`~tunelab.errors.DataError` naming the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            Problem(
                str(folder),
                None,
                None,
                "not an evaluation folder (expected metrics.json and predictions.jsonl, written by `tunelab eval` or `tunelab baseline`)",
            )
        )
    meta_path, pred_path = folder / "metrics.json", folder / "predictions.jsonl"
    try:
        meta = json.loads(read_text(meta_path))
    except json.JSONDecodeError as e:
        raise DataError(
            Problem(str(meta_path), e.lineno, None, f"not valid JSON: {e.msg}")
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("metrics", {}), dict):
        raise DataError(
            Problem(str(meta_path), None, None, "expected a JSON object with a 'metrics' object")
        )
    problems: list[Problem] = []
    records: list[dict] = []
    seen: set[tuple[str, int]] = set()
    for line_no, record in read_jsonl(pred_path, read_text(pred_path), problems=problems):
        problem = _check_record(record)
        if problem is None and (record["source"], record["index"]) in seen:
            problem = f"example {record['source']} #{record['index']} appears twice"
        if problem:
            problems.append(Problem(str(pred_path), line_no, None, problem))
            continue
        seen.add((record["source"], record["index"]))
        records.append(record)
    if problems:
        raise DataError(sorted(problems, key=lambda p: p.line or 0))
    if not records:
        raise DataError(Problem(str(pred_path), None, None, "no predictions in the file"))
    name = (
        meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else folder.name
    )
    return EvalRun(name, meta, records, folder)


def _check_record(r: object) -> str | None:
    if not isinstance(r, dict):
        return "expected a JSON object"
    for key, kind in (("index", int), ("source", str), ("reference", str), ("prediction", str)):
        if key not in r:
            return f"missing '{key}'"
        if not isinstance(r[key], kind) or isinstance(r[key], bool):
            return f"'{key}' should be a {'integer' if kind is int else 'string'}"
    for key in ("prompt", "prompt_hash"):
        if not isinstance(r.get(key, ""), str):
            return f"'{key}' should be a string"
    scores = r.get("scores")
    if not isinstance(scores, dict):
        return "missing 'scores' (an object of metric: number or null)"
    for k, v in scores.items():
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ):
            return f"scores.{k}: {v!r} is not a number or null"
    return None


# --- aligning --------------------------------------------------------------------------------


def alignment_keys(runs: Sequence[EvalRun]) -> list[dict[tuple, dict]]:
    """Per run, its records by an alignment key that depends on the example's content only, so
    two evaluations of one test file align however its path was spelled (relative, absolute,
    another working folder): ``(content, n)``, where ``content`` is the record's
    ``prompt_hash`` (a hash of the example's own turns before the reply, system included; see
    :func:`tunelab.evaluate.run.prompt_hash`) and ``n`` counts earlier records of the same
    content (exact duplicates stay apart, in file order). The reference is deliberately not part of the key:
    an example whose reference changed still aligns, and :func:`compare` then refuses it.

    When a run's records lack ``prompt_hash`` (older files), every run uses the record's
    ``prompt`` text (its last user message) instead; when some lack that too, the old key,
    ``(source, index)`` (the test file's path as given, and the position)."""
    records = [sorted(run.records, key=lambda r: r["index"]) for run in runs]
    if all("prompt_hash" in r for rs in records for r in rs):
        field_name = "prompt_hash"
    elif all("prompt" in r for rs in records for r in rs):
        field_name = "prompt"
    else:
        return [{(r["source"], r["index"]): r for r in rs} for rs in records]
    out = []
    for rs in records:
        seen: Counter = Counter()
        by_key = {}
        for r in rs:
            content = r[field_name]
            by_key[(content, seen[content])] = r
            seen[content] += 1
        out.append(by_key)
    return out


def common_keys(by_key: Sequence[dict], first: int = 0) -> list:
    """The keys every run has, in the order of run ``first``."""
    return [k for k in by_key[first] if all(k in m for m in by_key)]


def _reference_problems(runs, by_key, keys, baseline_index) -> list[Problem]:
    """One problem per evaluation whose references differ from the baseline's on a common
    example: how many, and the first such example."""
    base = runs[baseline_index]
    problems = []
    for j, run in enumerate(runs):
        if j == baseline_index:
            continue
        differ = [k for k in keys if by_key[j][k]["reference"] != by_key[baseline_index][k]["reference"]]  # fmt: skip
        if not differ:
            continue
        first_base, first_run = by_key[baseline_index][differ[0]], by_key[j][differ[0]]
        example = f"{first_base['source']}" + (f" ({_clip(first_base['prompt'], 60)!r})" if first_base.get("prompt") else "")  # fmt: skip
        problems.append(Problem(str(run.folder or run.name), None, None,
            f"{len(differ)} of the {len(keys)} examples it shares with the baseline {base.name} "
            f"({base.folder or base.name}) have a different reference (was the test file changed "
            f"between the two evaluations?), e.g. {example}: {base.name} has "
            f"{_clip(first_base['reference'], 80)!r}, {run.name} has {_clip(first_run['reference'], 80)!r}; "
            "evaluate both on the same test file, or pass --allow-different-references to compare anyway"))  # fmt: skip
    return problems


# --- comparing -------------------------------------------------------------------------------


def compare(
    runs: list[EvalRun],
    *,
    baseline_index: int = 0,
    main_metric: str | None = None,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    max_examples: int = 5,
    allow_different_references: bool = False,
) -> Comparison:
    """Align the runs' examples by content (:func:`alignment_keys`; only those every run has).
    When a common example's reference differs between the baseline and another run (the test
    file changed in between) this is a :class:`~tunelab.errors.DataError` naming the runs and
    an example, unless ``allow_different_references`` (then a note says how many). Then per
    metric: each run's mean over the common examples scored in every run, and each run against
    the baseline: the paired-bootstrap interval of the difference and, for right-or-wrong
    metrics, the flips. Metrics only in metrics.json (loss, perplexity, corpus BLEU) are shown
    as each run reported them, over its own examples, without an interval. The most instructive
    examples: those the best run (on ``main_metric``, default the first of :data:`MAIN_METRICS`
    present) fixed or broke, up to ``max_examples`` each, largest differences first."""
    if len(runs) < 2:
        raise ConfigError("compare: give at least two evaluations (the first is the baseline)")
    if not 0 <= baseline_index < len(runs):
        raise ConfigError(f"compare: baseline_index {baseline_index} is not one of the {len(runs)} runs")  # fmt: skip
    _unique_names(runs)
    by_key = alignment_keys(runs)
    keys = common_keys(by_key, baseline_index)
    if not keys:
        where = str(runs[baseline_index].folder or runs[baseline_index].name)
        raise DataError(Problem(where, None, None, "no example in common with the other evaluations (same data file?)"))  # fmt: skip
    if not allow_different_references:
        problems = _reference_problems(runs, by_key, keys, baseline_index)
        if problems:
            raise DataError(problems)
    dropped = [len(m) - len(keys) for m in by_key]
    c = Comparison(runs, baseline_index, [], len(keys), dropped, None, None, confidence=confidence, resamples=resamples)  # fmt: skip
    c.notes = _notes(runs, by_key, keys, dropped)
    tables: dict[str, tuple[list, np.ndarray]] = {}  # metric -> (keys, scores[run, example])
    for metric in sorted({m for run in runs for r in run.records for m in r["scores"]}, key=_order):
        valid, scores = _score_table(metric, by_key, keys)
        if len(valid) < len(keys):
            c.notes.append(f"{metric}: {len(keys) - len(valid)} of the {len(keys)} common examples lack a score in some evaluation (a failed metric or judge call) and are left out of this row")  # fmt: skip
        if valid:
            tables[metric] = (valid, scores)
            c.rows.append(_metric_row(metric, scores, baseline_index, len(valid), resamples, seed, confidence))  # fmt: skip
    c.rows += _summary_rows(runs)
    if main_metric is not None and main_metric not in tables:
        raise ConfigError(f"compare: {main_metric!r} has no per-example scores (have: {', '.join(tables) or 'none'})")  # fmt: skip
    for metric in [main_metric] if main_metric else [m for m in MAIN_METRICS if m in tables]:
        valid, scores = tables[metric]
        others = [j for j in range(len(runs)) if j != baseline_index and not np.isnan(scores[j]).any()]  # fmt: skip
        if others and not np.isnan(scores[baseline_index]).any():
            best = max(others, key=lambda j: scores[j].mean())  # the first of equals
            diff = scores[best] - scores[baseline_index]
            # ties: first the examples the other runs got as wrong (right) as the baseline
            rest = [j for j in others if j != best]
            alike = (scores[rest] == scores[baseline_index]).sum(axis=0)
            fixed = [i for i in np.lexsort((-alike, -diff)) if diff[i] > 0][:max_examples]
            broken = [i for i in np.lexsort((-alike, diff)) if diff[i] < 0][:max_examples]
            c.main_metric, c.best_index = metric, best
            c.fixed = [_example(by_key, valid[i], scores[:, i], baseline_index) for i in fixed]
            c.broken = [_example(by_key, valid[i], scores[:, i], baseline_index) for i in broken]
            break
    return c


def _score_table(metric: str, by_key: list[dict], keys: list) -> tuple[list, np.ndarray]:
    """The keys scored on ``metric`` in every run that has it, and the scores [run, example]
    (a row of NaN for a run without the metric)."""
    present = [any(metric in r["scores"] for r in m.values()) for m in by_key]
    has = [m for m, p in zip(by_key, present, strict=True) if p]
    valid = [k for k in keys if all(m[k]["scores"].get(metric) is not None for m in has)]
    nan = [math.nan] * len(valid)
    rows = [[m[k]["scores"][metric] for k in valid] if p else nan for m, p in zip(by_key, present, strict=True)]  # fmt: skip
    return valid, np.array(rows, dtype=float).reshape(len(by_key), len(valid))


def _metric_row(metric, scores, baseline_index, n, resamples, seed, confidence) -> MetricRow:
    present = ~np.isnan(scores).all(axis=1)
    binary = metric in FLIP_METRICS and bool(np.isin(scores[present], (0.0, 1.0)).all())
    deltas: list[Delta | None] = [None] * len(scores)
    for j in np.flatnonzero(present):
        if j != baseline_index and present[baseline_index]:
            a, b = scores[baseline_index], scores[j]
            mean, lo, hi = paired_bootstrap(a, b, resamples=resamples, seed=seed, confidence=confidence)  # fmt: skip
            deltas[j] = Delta(mean, lo, hi, *(flips(a, b) if binary else (None, None)))
    values = [float(s.mean()) if p else None for s, p in zip(scores, present, strict=True)]
    return MetricRow(metric, values, deltas, n)


def _order(metric: str) -> tuple[int, str]:
    return (ORDER.index(metric) if metric in ORDER else len(ORDER), metric)


def _unique_names(runs: list[EvalRun]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


def _notes(runs, by_key, keys, dropped) -> list[str]:
    notes = []
    if any(dropped):
        lost = ", ".join(f"{r.name}: {d}" for r, d in zip(runs, dropped, strict=True) if d)
        notes.append(f"{len(keys)} examples are in every evaluation; left out because another evaluation lacks them: {lost}")  # fmt: skip
    hashes = [h if isinstance(h := run.meta.get("data_sha256"), str) else None for run in runs]
    if all(hashes):  # the test files' contents: a path spelled differently is the same file
        if len(set(hashes)) > 1:
            named = ", ".join(f"{r.name}: {r.meta.get('data')} ({h[:12]})" for r, h in zip(runs, hashes, strict=True))  # fmt: skip
            notes.append(f"the evaluations' test files differ in content: {named}")
    else:
        data = {str(run.meta["data"]) for run in runs if run.meta.get("data")}
        if len({os.path.abspath(d) for d in data}) > 1:  # relative to the current folder
            notes.append(f"the evaluations name different data files: {', '.join(sorted(data))}")
    differ = sum(len({m[k]["reference"] for m in by_key}) > 1 for k in keys)
    if differ:
        notes.append(f"{differ} common examples have different references in different evaluations")  # fmt: skip
    return notes


def _summary_rows(runs: list[EvalRun]) -> list[MetricRow]:
    """Numbers only in metrics.json: corpus BLEU, loss, perplexity, counts..."""
    values: dict[str, list[float | None]] = {}
    for j, run in enumerate(runs):
        per_example = {m for r in run.records for m in r["scores"]} - {"bleu"}
        for k, v in run.meta.get("metrics", {}).items():
            if k not in per_example and isinstance(v, int | float) and not isinstance(v, bool):
                name = "bleu (corpus)" if k == "bleu" else k
                values.setdefault(name, [None] * len(runs))[j] = float(v)
    first = ("bleu (corpus)", "loss", "perplexity")
    ordered = sorted(values, key=lambda m: (first.index(m) if m in first else len(first), m))
    return [MetricRow(m, values[m], [None] * len(runs), None) for m in ordered]


def _example(by_key, key, scores, baseline_index) -> Example:
    base = by_key[baseline_index][key]
    predictions = [m[key]["prediction"] for m in by_key]
    return Example(base["source"], base["index"], base.get("prompt", ""), base["reference"], predictions, [float(s) for s in scores])  # fmt: skip


# --- reporting -------------------------------------------------------------------------------


def _num(metric: str | None, v: float | None, *, sign: bool = False) -> str:
    if v is None or math.isnan(v):
        return "—"
    digits = 2 if metric in WIDE else 3
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal, Markdown and HTML tables."""
    base = c.runs[c.baseline_index].name
    header = ["metric", "n"]
    for j, run in enumerate(c.runs):
        header += [run.name] if j == c.baseline_index else [run.name, f"Δ vs {base} [{c.confidence:.0%} CI]", "fixed / broken"]  # fmt: skip
    rows = []
    for row in c.rows:
        cells = [row.metric, "own" if row.n is None else str(row.n)]
        for j, (v, d) in enumerate(zip(row.values, row.deltas, strict=True)):
            cells.append(_num(row.metric, v))
            if j == c.baseline_index:
                continue
            if d is None:
                cells += ["", ""]
                continue
            lo, hi = _num(row.metric, d.lo, sign=True), _num(row.metric, d.hi, sign=True)
            cells.append(f"{_num(row.metric, d.mean, sign=True)} [{lo}, {hi}]{' *' if d.significant else ''}")  # fmt: skip
            cells.append("" if d.wrong_to_right is None else f"{d.wrong_to_right} / {d.right_to_wrong}")  # fmt: skip
        rows.append(cells)
    return header, rows


def _legend(c: Comparison) -> list[str]:
    lines = [
        "n: examples behind the row (in every evaluation and scored in each); own: the number each evaluation reported in metrics.json, over its own examples, without an interval.",
        f"Δ: mean difference to the baseline over the same examples; [..]: paired bootstrap {c.confidence:.0%} interval ({c.resamples} resamples); * the interval excludes 0.",
        "fixed / broken: examples wrong in the baseline and right in this evaluation / right in the baseline and wrong in this one.",
        "bleu: mean sentence BLEU (per example, for the interval); bleu (corpus): corpus BLEU. BLEU and ROUGE measure n-gram overlap: weak evidence on exact tasks.",
    ]  # fmt: skip
    return lines + c.notes


def format_table(c: Comparison) -> str:
    """The comparison as aligned plain text, for the terminal."""
    header, rows = _table(c)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(cells, widths, strict=True))]  # fmt: skip
        return "  ".join(padded).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *map(line, rows), ""]
    if c.best_index is not None:
        lines.append(f"best on {c.main_metric}: {c.runs[c.best_index].name}")
    return "\n".join(lines + _legend(c))


def _describe(run: EvalRun, baseline: bool) -> str:
    m = run.meta
    adapter = f" + adapter {m['adapter']}" if m.get("adapter") else ""
    role = " (baseline)" if baseline else ""
    return f"{run.name}{role}: {m.get('model', '?')}{adapter}, {m.get('shots', 0)}-shot, {len(run.records)} examples"  # fmt: skip


def _clip(text: str, limit: int, *, keep_end: bool = False) -> str:
    """At most ``limit`` characters; a prompt keeps its end (the question after the shots)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def _sections(c: Comparison) -> list[tuple[str, list[tuple[str, list[tuple[str, str]]]]]]:
    """The instructive examples as (section title, [(example title, [(label, text)])])."""
    if c.best_index is None:
        return []
    best, base = c.runs[c.best_index].name, c.runs[c.baseline_index].name
    out = []
    for verb, examples in (("better", c.fixed), ("worse", c.broken)):
        title = f"{'Fixed' if verb == 'better' else 'Broken'}: {verb} in {best} than in {base} on {c.main_metric}"  # fmt: skip
        items = []
        for e in examples:
            parts = [("prompt", _clip(e.prompt, 600, keep_end=True)), ("reference", _clip(e.reference, 400))]  # fmt: skip
            parts += [(f"{r.name} ({c.main_metric} {_num(c.main_metric, s)})", _clip(p, 400)) for r, p, s in zip(c.runs, e.predictions, e.scores, strict=True)]  # fmt: skip
            items.append((f"{e.source} (#{e.index})", parts))
        out.append((title, items))
    return out


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}\n{text}\n{ticks}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(c: Comparison) -> str:
    header, rows = _table(c)
    out = [f"# Comparison: {len(c.runs)} evaluations, {c.aligned} common examples", ""]
    out += [f"- {_describe(r, j == c.baseline_index)}" for j, r in enumerate(c.runs)]
    out += ["", "| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    out += [""] + [f"- {line}" for line in _legend(c)]
    for title, items in _sections(c):
        out += ["", f"## {title}"] + ([] if items else ["", "None."])
        for heading, parts in items:
            out += ["", f"### {heading}"]
            for label, text in parts:
                short = "\n" not in text and "`" not in text and 0 < len(text) <= 120
                out += ["", f"**{label}**: `{text}`"] if short else ["", f"**{label}**:", "", _fence(text)]  # fmt: skip
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:90em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em}
td{text-align:right;font-variant-numeric:tabular-nums}td:first-child{text-align:left}
pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;word-break:break-word;margin:.2em 0 .8em}
small{color:#666}h3{margin-top:1.5em}"""


def _html(c: Comparison) -> str:
    e = html.escape
    header, rows = _table(c)
    title = f"Comparison: {len(c.runs)} evaluations, {c.aligned} common examples"
    out = ["<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>"]
    out += [f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", "<ul>"]
    out += [f"<li>{e(_describe(r, j == c.baseline_index))}</li>" for j, r in enumerate(c.runs)]
    out += ["</ul>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(s)}</td>" for s in r) + "</tr>" for r in rows]
    out += ["</table>", "<ul>", *(f"<li><small>{e(line)}</small></li>" for line in _legend(c)), "</ul>"]  # fmt: skip
    png = _chart_png(c)
    if png:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<p><img alt="bar chart: each metric per evaluation" src="data:image/png;base64,{data}"></p>')  # fmt: skip
    for section, items in _sections(c):
        out.append(f"<h2>{e(section)}</h2>" + ("" if items else "<p>None.</p>"))
        for heading, parts in items:
            out.append(f"<h3>{e(heading)}</h3>")
            out += [f"<b>{e(label)}</b><pre>{e(text)}</pre>" for label, text in parts]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _chart_png(c: Comparison) -> bytes | None:
    """Grouped bars: each 0-1 metric (or else the main metric), one bar per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in c.rows if r.metric in CHARTED and r.n is not None]
    rows = rows or [r for r in c.rows if r.metric == c.main_metric and r.n is not None]
    if not rows:
        return None
    fig = Figure(figsize=(min(14.0, 3.0 + 0.35 * len(rows) * len(c.runs)), 3.6), layout="constrained")  # fmt: skip
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(c.runs)
    x = np.arange(len(rows))
    for j, run in enumerate(c.runs):
        heights = [r.values[j] if r.values[j] is not None else 0.0 for r in rows]
        bars = ax.bar(x + (j - (len(c.runs) - 1) / 2) * width, heights, width, label=run.name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, [r.metric for r in rows])
    if all(r.metric in CHARTED for r in rows):
        ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"mean over {c.aligned} common examples")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_report(c: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/compare.md`` and a self-contained ``out_dir/compare.html`` (inline CSS
    and chart, every text escaped), each atomically. Returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "compare.md", out_dir / "compare.html"
    atomic_write_text(md, _markdown(c))
    atomic_write_text(page, _html(c))
    return md, page
