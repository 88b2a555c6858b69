"""A task metric for the extraction example: partial credit per field.

Strict JSON equality (``json_equal``) says whether the whole answer is right; this says how
much of it is. Use it with

    tunelab eval RUN --data examples/extract/test.jsonl --metric examples/extract/metric.py:field_accuracy

or ``eval.metric: examples/extract/metric.py:field_accuracy`` in the YAML. Its per-example
scores land under ``task`` in predictions.jsonl and ``tunelab compare`` shows them.
"""

from __future__ import annotations

import json

KEYS = ("name", "city", "product", "quantity", "phone")


def _parse(text: str):
    text = text.strip()
    if text.startswith("```") and text.endswith("```"):  # a Markdown fence, ```json ... ```
        text = text[3:-3].strip()
        text = text[4:] if text.lower().startswith("json") else text
    return json.loads(text)


def _same(a, b) -> bool:
    """JSON equality for one value: true is not 1, 3 equals 3.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def field_accuracy(prediction: str, reference: str, record: dict) -> float:
    """The share of the 5 keys whose value in the answer equals the reference's (a missing
    key counts as wrong); 0.0 if the answer is not a JSON object. A reference that is not a
    JSON object raises: that is a data problem, reported by tunelab for that example instead of
    being scored."""
    ref = _parse(reference)
    if not isinstance(ref, dict):
        raise ValueError(f"the reference is not a JSON object: {reference[:80]!r}")
    try:
        pred = _parse(prediction)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return 0.0
    if not isinstance(pred, dict):
        return 0.0
    return sum(k in pred and _same(pred[k], ref.get(k)) for k in KEYS) / len(KEYS)
