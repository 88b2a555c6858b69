"""Scores for generated answers: exact match, JSON equality, BLEU-4, ROUGE-1/2/L, your own.

Which metric measures what:

- **exact_match** and **json_equal** are the right measures for *exact* tasks (extraction,
  classification, short factual answers, structured output): the answer is right or wrong.
- **BLEU-4** (sacrebleu) and **ROUGE-1/2/L** (rouge-score) measure *n-gram overlap* with the
  reference. They are useful for open-ended answers (summaries, explanations, rewrites), where
  many wordings are acceptable, but weak for exact tasks: ``{"quantity": 3}`` and
  ``{"quantity": 30}`` share almost every n-gram and still one of them is wrong.
- **task** is your own function (``eval.metric: my_module:score``), e.g. run generated SQL
  against a database and compare the result sets.

Every per-example score is a float, or ``None`` where your metric failed on that example (a
failure is reported, never scored as a number; see :func:`score_all`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tunelab.errors import ConfigError

#: The names :func:`score_all` accepts (``rouge`` expands to rouge1, rouge2, rougeL).
METRIC_NAMES = ("exact_match", "contains", "json_equal", "bleu", "rouge", "task")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: At most this many failure messages are kept in the summary (the count is always exact).
MAX_FAILURE_MESSAGES = 20

UserMetric = Callable[[str, str, dict], float]
Reference = str | Sequence[str]  # one reference, or several acceptable ones

_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)


# --- exact match -----------------------------------------------------------------------------


def normalize_text(
    s: str, *, lower: bool = True, strip_punctuation: bool = True, collapse_whitespace: bool = True
) -> str:
    """``s`` in Unicode NFC, lowercased, without punctuation (any Unicode ``P*`` character,
    removed rather than replaced by a space, as in SQuAD), runs of whitespace made one space,
    and surrounding whitespace stripped."""
    s = unicodedata.normalize("NFC", s)
    if lower:
        s = s.lower()
    if strip_punctuation:
        s = "".join(c for c in s if not unicodedata.category(c).startswith("P"))
    if collapse_whitespace:
        s = " ".join(s.split())
    return s.strip()


def exact_match(pred: str, ref: str, *, normalize: bool = False) -> float:
    """1.0 if the answer equals the reference, else 0.0.

    Without ``normalize`` only surrounding whitespace is ignored; with it both sides go through
    :func:`normalize_text` first (case, punctuation and spacing are ignored)."""
    if normalize:
        return float(normalize_text(pred) == normalize_text(ref))
    return float(pred.strip() == ref.strip())


# --- JSON equality ---------------------------------------------------------------------------


def contains(pred: str, ref: str) -> float:
    """1.0 when the normalised reference appears in the normalised answer as whole words.

    For short factual answers a chatty model wraps in a sentence ("The capital of France is
    Paris." for "Paris"); exact match would call that wrong."""
    p, r = f" {normalize_text(pred)} ", f" {normalize_text(ref)} "
    return 1.0 if r.strip() and r in p else 0.0


def parse_json(text: str) -> tuple[bool, object]:
    """``(True, value)`` if ``text`` is one JSON value (surrounding whitespace and an optional
    Markdown fence, ```` ```json ... ``` ````, are ignored), else ``(False, None)``."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def json_same(a: object, b: object) -> bool:
    """Equality of parsed JSON values: objects ignore key order, arrays keep their order,
    ``true`` equals only ``true`` (never ``1``), and numbers compare by value (``1 == 1.0``,
    as in Python and in JSON itself, which has one number type)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return False
    return a == b


def json_equal(pred: str, ref: str) -> float:
    """1.0 if both texts parse as JSON (see :func:`parse_json`) and the values are equal (see
    :func:`json_same`), else 0.0. An unparseable answer scores 0.0; so does an unparseable
    reference (check your data: every answer is then wrong)."""
    ok_p, p = parse_json(pred)
    ok_r, r = parse_json(ref)
    return float(ok_p and ok_r and json_same(p, r))


# --- BLEU and ROUGE --------------------------------------------------------------------------


def _alternatives(ref: Reference) -> list[str]:
    return [ref] if isinstance(ref, str) else list(ref)


@lru_cache(maxsize=2)
def _bleu_metric(sentence: bool):
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=sentence)


def bleu(preds: Sequence[str], refs: Sequence[Reference]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenizer, case-sensitive, exponential
    smoothing), 0-100.

    BLEU is the geometric mean of 1- to 4-gram precisions of the answers against the references
    (counts pooled over the whole corpus) times a brevity penalty: n-gram overlap, useful for
    open-ended answers, weak for exact tasks. Each reference may be a string or a list of
    acceptable references for that example."""
    _same_length(preds, refs)
    if not preds:
        return 0.0
    alts = [_alternatives(r) for r in refs]
    streams = [[a[i] if i < len(a) else None for a in alts] for i in range(max(map(len, alts)))]
    return float(_bleu_metric(False).corpus_score(list(preds), streams).score)


def sentence_bleu(pred: str, ref: Reference) -> float:
    """BLEU-4 of one answer (0-100), with sacrebleu's effective order (n-gram orders longer
    than the answer are left out) so short answers are not all zero. Noisier than corpus BLEU;
    kept per example for paired comparisons."""
    return float(_bleu_metric(True).sentence_score(pred, _alternatives(ref)).score)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_one(pred: str, ref: Reference) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 (unigram and bigram overlap) and ROUGE-L (longest common subsequence)
    F1 of one answer, 0-1, with rouge-score's Porter stemmer.

    n-gram overlap: useful for open-ended answers, weak for exact tasks. rouge-score's
    tokenizer keeps only ``[a-z0-9]`` after lowercasing, so accents are split off and text in
    non-Latin scripts has no tokens (scores 0). With several references, the best one counts."""
    alts = _alternatives(ref)
    scorer = _rouge_scorer()
    # rouge-score takes (target, prediction) in that order
    scores = scorer.score(alts[0], pred) if len(alts) == 1 else scorer.score_multi(alts, pred)
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def rouge(preds: Sequence[str], refs: Sequence[Reference]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the examples (see :func:`rouge_one`)."""
    _same_length(preds, refs)
    if not preds:
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    each = [rouge_one(p, r) for p, r in zip(preds, refs, strict=True)]
    return {k: sum(s[k] for s in each) / len(each) for k in ROUGE_TYPES}


# --- your own metric -------------------------------------------------------------------------


def load_user_metric(spec: str) -> UserMetric:
    """Import ``package.module:function`` or ``path/to/file.py:function``.

    The function is called as ``fn(prediction, reference, record) -> float`` where ``record``
    is the example's predictions.jsonl record without its scores (index, source, prompt,
    reference, prediction). A module name is looked up on ``sys.path`` and then in the current
    folder. Every problem is a :class:`~tunelab.errors.ConfigError` naming the spec."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(
            f"eval.metric {spec!r}: expected 'module:function' or 'path/to/file.py:function'"
        )

    def fail(message: str) -> ConfigError:
        return ConfigError(f"eval.metric {spec!r}: {message}")

    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _import_file(Path(where), fail)
    else:
        module = _import_module(where, fail)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        has = f" (it has: {', '.join(public)})" if public else ""
        raise fail(f"{where} has no function {name!r}{has}")
    fn = getattr(module, name)
    if not callable(fn):
        raise fail(f"{name} in {where} is not a function: {_short(repr(fn))}")
    try:
        inspect.signature(fn).bind("prediction", "reference", {})
    except TypeError:
        raise fail(
            f"{name}{inspect.signature(fn)} must accept (prediction, reference, record)"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    return fn


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _import_file(path: Path, fail: Callable[[str], ConfigError]):
    if not path.is_file():
        raise fail(f"file {path} not found")
    module_name = f"tunelab_user_metric_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise fail(f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import would (dataclasses, pickling need it)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise fail(f"importing {path} raised {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str, fail: Callable[[str], ConfigError]):
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # last: never shadows an installed package
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise fail(f"no module named {name!r} (on sys.path or in {cwd})") from None
        raise fail(f"importing {name} raised ModuleNotFoundError: {e}") from e
    except Exception as e:
        raise fail(f"importing {name} raised {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def _call_user_metric(fn: UserMetric, pred: str, ref: str, record: dict) -> float:
    value = fn(pred, ref, record)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"returned {value!r}, expected a finite number")
    return float(value)


# --- everything at once ----------------------------------------------------------------------


def score_all(
    preds: Sequence[str],
    refs: Sequence[str],
    records: Sequence[Mapping] | None,
    *,
    names: Sequence[str],
    normalize: bool = False,
    user_metric: UserMetric | None = None,
) -> tuple[dict[str, list[float | None]], dict[str, object]]:
    """Score every answer with each metric in ``names`` (see :data:`METRIC_NAMES`).

    Returns ``(per_example, summary)``. ``per_example[metric]`` has one score per answer
    (sentence BLEU for ``bleu``; ``rouge`` gives ``rouge1``, ``rouge2``, ``rougeL``).
    ``summary[metric]`` is the mean, except ``bleu``: corpus BLEU.

    ``task`` calls ``user_metric(prediction, reference, record)`` (``record`` without
    ``scores``). When it raises, or returns something that is not a finite number, for an
    example, that example's score is ``None`` (never a made-up 0.0) and scoring goes on: the
    answers were expensive to generate. ``summary["task"]`` is then the mean over the examples
    it did score (``None`` if none), ``summary["task_failed"]`` the number of failures and
    ``summary["task_failures"]`` the first :data:`MAX_FAILURE_MESSAGES` messages, each
    ``"#index (source): Error: message"``.
    """
    _same_length(preds, refs)
    records = [{}] * len(preds) if records is None else records
    _same_length(preds, records, what="records")
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {unknown} (known: {', '.join(METRIC_NAMES)})")
    if "task" in names and user_metric is None:
        raise ConfigError("eval.metric: the 'task' metric needs your function (module:function)")

    per: dict[str, list[float | None]] = {}
    summary: dict[str, object] = {}
    if "exact_match" in names:
        per["exact_match"] = [
            exact_match(p, r, normalize=normalize) for p, r in zip(preds, refs, strict=True)
        ]
    if "contains" in names:
        per["contains"] = [contains(p, r) for p, r in zip(preds, refs, strict=True)]
    if "json_equal" in names:
        per["json_equal"] = [json_equal(p, r) for p, r in zip(preds, refs, strict=True)]
    if "bleu" in names:
        per["bleu"] = [sentence_bleu(p, r) for p, r in zip(preds, refs, strict=True)]
        summary["bleu"] = bleu(preds, refs)
    if "rouge" in names:
        each = [rouge_one(p, r) for p, r in zip(preds, refs, strict=True)]
        for k in ROUGE_TYPES:
            per[k] = [s[k] for s in each]
    if "task" in names:
        scores, failures = [], []
        for i, (p, r, rec) in enumerate(zip(preds, refs, records, strict=True)):
            record = {k: v for k, v in rec.items() if k != "scores"}
            try:
                scores.append(_call_user_metric(user_metric, p, r, record))
            except Exception as e:
                scores.append(None)
                where = f"#{rec.get('index', i)}" + (
                    f" ({rec['source']})" if "source" in rec else ""
                )
                failures.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
        per["task"] = scores
        summary["task_failed"] = len(failures)
        summary["task_failures"] = failures[:MAX_FAILURE_MESSAGES]
    for k, values in per.items():
        if k != "bleu":
            summary[k] = _mean(values)
    order = [k for k in per] + [k for k in summary if k not in per]
    return per, {k: summary[k] for k in order}


def _mean(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def _same_length(a: Sequence, b: Sequence, *, what: str = "references") -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} {what}")
