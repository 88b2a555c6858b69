"""Metrics against hand-computed values, and BLEU/ROUGE against the libraries' own examples."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.evaluate.metrics import (
    bleu,
    exact_match,
    json_equal,
    load_user_metric,
    normalize_text,
    rouge,
    rouge_one,
    score_all,
    sentence_bleu,
)

EXAMPLE_METRIC = Path(__file__).parents[2] / "examples" / "extract" / "metric.py"


# --- exact match -----------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  Hello,   World!\n") == "hello world"
    assert normalize_text("“São-Paulo”.") == "sãopaulo"  # Unicode punctuation, removed not spaced
    assert normalize_text("A  b.", lower=False) == "A b"
    assert normalize_text("A  b.", strip_punctuation=False) == "a b."
    assert normalize_text(" a  b ", collapse_whitespace=False) == "a  b"
    assert normalize_text("Cafe\u0301") == normalize_text("Café")  # NFC


@pytest.mark.parametrize(
    ("pred", "ref", "plain", "normalized"),
    [
        ("Paris", "Paris", 1.0, 1.0),
        ("  Paris\n", "Paris", 1.0, 1.0),  # surrounding whitespace never counts
        ("paris", "Paris", 0.0, 1.0),
        ("Paris.", "Paris", 0.0, 1.0),
        ("New  York", "new york", 0.0, 1.0),
        ("Paris, France", "Paris", 0.0, 0.0),
        ("", "", 1.0, 1.0),
    ],
)
def test_exact_match(pred, ref, plain, normalized):
    assert exact_match(pred, ref) == plain
    assert exact_match(pred, ref, normalize=True) == normalized


# --- JSON equality ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ('{"a": 1, "b": [1, 2]}', '{"b": [1, 2], "a": 1}', 1.0),  # key order is irrelevant
        ('{"a":1,"b":[1,2]}', '{"a": 1, "b": [1, 2]}', 1.0),  # so is spacing
        ('{"a": [2, 1]}', '{"a": [1, 2]}', 0.0),  # array order is not
        ('{"a": true}', '{"a": 1}', 0.0),  # a bool is never a number
        ("[true, false]", "[1, 0]", 0.0),
        ("false", "0", 0.0),
        ('{"a": true}', '{"a": true}', 1.0),
        ('{"q": 3.0}', '{"q": 3}', 1.0),  # numbers compare by value
        ('{"a": null}', "{}", 0.0),  # a null key is still a key
        ('{"a": "1"}', '{"a": 1}', 0.0),
        ('```json\n{"a": 1}\n```', '{"a": 1}', 1.0),  # fenced answer
        ('```\n{"a": 1}\n```', '{"a": 1}', 1.0),
        ('  ```JSON {"a": 1} ```  ', '{"a": 1}', 1.0),
        ('{"a": 1', '{"a": 1}', 0.0),  # invalid answer
        ('{"a": 1} and more', '{"a": 1}', 0.0),  # trailing text
        ("", '{"a": 1}', 0.0),
        ('Sure! {"a": 1}', '{"a": 1}', 0.0),
        ('{"a": 1}', "not json", 0.0),  # unparseable reference: never right
        ('"x"', '"x"', 1.0),
    ],
)
def test_json_equal(pred, ref, expected):
    assert json_equal(pred, ref) == expected


# --- BLEU ------------------------------------------------------------------------------------

# sacrebleu's README ("Using SacreBLEU from Python"): two reference sets, three sentences.
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS_A = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
REFS_B = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]


def test_bleu_matches_the_sacrebleu_readme():
    per_example = [[a, b] for a, b in zip(REFS_A, REFS_B, strict=True)]
    assert round(bleu(SYS, per_example), 2) == 48.53  # "BLEU = 48.53 82.4/50.0/45.5/37.5"


def test_bleu_with_a_variable_number_of_references_matches_the_readme():
    per_example = [[REFS_B[0]], [REFS_A[1], REFS_B[1]], [REFS_A[2], REFS_B[2]]]
    assert round(bleu(SYS, per_example), 2) == 29.44  # "BLEU = 29.44 82.4/42.9/27.3/12.5"


def test_bleu_by_hand():
    # precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty (same length)
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)
    assert sentence_bleu("a b c d e", "a b c d f") == pytest.approx(expected)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0
    assert bleu([], []) == 0.0


def test_corpus_bleu_pools_counts_and_sentence_bleu_uses_effective_order():
    # two 4-token sentences: corpus 1-gram 8/8, 2-gram 5/6, 3-gram 2/4, 4-gram 0/2 -> smoothed
    preds, refs = ["a b c d", "yes"], ["a b c d", "yes"]
    assert bleu(preds, refs) == pytest.approx(100)
    # one word: with effective order only the 1-gram precision counts
    assert sentence_bleu("yes", "yes") == pytest.approx(100)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])


# --- ROUGE -----------------------------------------------------------------------------------


def test_rouge_on_the_rouge_score_readme_example_by_hand():
    # rouge-score's README: target "The quick brown fox jumps over the lazy dog" (9 tokens),
    # prediction "The quick brown dog jumps on the log." (8 tokens)
    s = rouge_one("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")  # fmt: skip
    # unigrams in common: the x2, quick, brown, dog, jumps = 6 -> F1 = 2*6/(8+9)
    assert s["rouge1"] == pytest.approx(12 / 17)
    # bigrams in common: "the quick", "quick brown" = 2 of 7 and 8 -> F1 = 2*2/(7+8)
    assert s["rouge2"] == pytest.approx(4 / 15)
    # longest common subsequence: the quick brown jumps the = 5 -> F1 = 2*5/(8+9)
    assert s["rougeL"] == pytest.approx(10 / 17)


def test_rouge_stems_averages_and_takes_the_best_reference():
    assert rouge_one("the cats were running", "the cat was running")["rouge1"] == pytest.approx(3 / 4)  # fmt: skip
    assert rouge_one("a b", ["x y", "a b"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    means = rouge(["a b", "c d"], ["a b", "c e"])
    assert means["rouge1"] == pytest.approx((1 + 1 / 2) / 2)
    assert means["rouge2"] == pytest.approx((1 + 0) / 2)
    assert rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


# --- the user's metric -----------------------------------------------------------------------


def _write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_load_user_metric_from_a_file_and_a_module(tmp_path, monkeypatch):
    _write(tmp_path / "scorer.py", """
        from dataclasses import dataclass

        @dataclass
        class Result:  # needs its module in sys.modules
            ok: bool

        def score(prediction, reference, record):
            return float(Result(prediction == reference).ok)
    """)  # fmt: skip
    fn = load_user_metric(f"{tmp_path / 'scorer.py'}:score")
    assert fn("a", "a", {}) == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_user_metric("scorer:score")("a", "b", {}) == 0.0


def test_a_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    _write(tmp_path / "cwd_metric_mod.py", "def score(p, r, record):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])  # fmt: skip
    assert load_user_metric("cwd_metric_mod:score")("a", "b", {}) == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'module:function'"),
        ("mod:", "expected 'module:function'"),
        ("{tmp}/missing.py:f", "missing.py not found"),
        ("{tmp}/m.py:nope", r"has no function 'nope' \(it has: helper, score, two_args\)"),
        ("{tmp}/m.py:CONSTANT", "CONSTANT in .*m.py is not a function: 3"),
        ("{tmp}/m.py:two_args", r"must accept \(prediction, reference, record\)"),
        ("{tmp}/broken.py:f", "importing .*broken.py raised ZeroDivisionError"),
        ("tunelab_no_such_module_xyz:f", "no module named 'tunelab_no_such_module_xyz'"),
        ("tunelab.no_such_submodule:f", "no module named 'tunelab.no_such_submodule'"),
    ],
)
def test_load_user_metric_errors(tmp_path, spec, message):
    _write(tmp_path / "m.py", """
        CONSTANT = 3
        def score(prediction, reference, record): return 1.0
        def helper(*args): return 0.0
        def two_args(prediction, reference): return 1.0
    """)  # fmt: skip
    _write(tmp_path / "broken.py", "1 / 0\n")
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        load_user_metric(spec)
    assert str(info.value).startswith(f"eval.metric {spec!r}: ")


def test_the_example_extraction_metric():
    fn = load_user_metric(f"{EXAMPLE_METRIC}:field_accuracy")
    ref = '{"name": "Maria Lopez", "city": "Lisbon", "product": "blue mug", "quantity": 3, "phone": null}'  # fmt: skip
    assert fn(ref, ref, {}) == 1.0
    reordered = '```json\n{"phone": null, "quantity": 3.0, "product": "blue mug", "city": "Lisbon", "name": "Maria Lopez"}\n```'  # fmt: skip
    assert fn(reordered, ref, {}) == 1.0
    # name wrong, quantity a string, phone missing: 2 of 5 right
    assert fn('{"name": "Maria", "city": "Lisbon", "product": "blue mug", "quantity": "3"}', ref, {}) == pytest.approx(2 / 5)  # fmt: skip
    assert fn('{"name": "Maria Lopez", "quantity": true}', ref, {}) == pytest.approx(1 / 5)
    assert fn("Maria Lopez, Lisbon", ref, {}) == 0.0
    assert fn('["Maria Lopez"]', ref, {}) == 0.0
    with pytest.raises(ValueError, match="reference is not a JSON object"):
        fn(ref, "[1]", {})


# --- everything at once ----------------------------------------------------------------------


def test_score_all_expands_rouge_and_summarises():
    preds = ["Paris", "the cat sat", '{"a": 1}']
    refs = ["paris", "the cat sat", '{"a": 1}']
    per, summary = score_all(preds, refs, None, names=["exact_match", "json_equal", "bleu", "rouge"], normalize=True)  # fmt: skip
    assert list(per) == ["exact_match", "json_equal", "bleu", "rouge1", "rouge2", "rougeL"]
    assert per["exact_match"] == [1.0, 1.0, 1.0]
    assert per["json_equal"] == [0.0, 0.0, 1.0]
    assert per["bleu"] == pytest.approx([sentence_bleu(p, r) for p, r in zip(preds, refs, strict=True)])  # fmt: skip
    assert summary["bleu"] == pytest.approx(bleu(preds, refs))  # corpus BLEU, not the mean
    assert summary["json_equal"] == pytest.approx(1 / 3)
    assert summary["rouge1"] == pytest.approx(sum(per["rouge1"]) / 3)
    assert "task" not in summary


def test_a_failing_user_metric_is_reported_not_scored():
    seen = []

    def metric(prediction, reference, record):
        seen.append(record)
        if prediction == "boom":
            raise RuntimeError("cannot execute SQL")
        return "high" if prediction == "str" else prediction == reference

    records = [{"index": i, "source": f"t.jsonl:{i + 1}", "prompt": "q", "scores": {"x": 1}} for i in range(4)]  # fmt: skip
    per, summary = score_all(["a", "boom", "str", "b"], ["a", "a", "a", "a"], records, names=["task"], user_metric=metric)  # fmt: skip
    assert per["task"] == [1.0, None, None, 0.0]
    assert summary["task"] == pytest.approx(0.5)  # over the 2 examples it scored
    assert summary["task_failed"] == 2
    assert summary["task_failures"] == [
        "#1 (t.jsonl:2): RuntimeError: cannot execute SQL",
        "#2 (t.jsonl:3): TypeError: returned 'high', expected a finite number",
    ]
    assert all("scores" not in r and r["prompt"] == "q" for r in seen)  # the record, minus scores


def test_a_user_metric_that_always_fails_gives_no_mean():
    per, summary = score_all(["a"], ["a"], [{}], names=["task"], user_metric=lambda p, r, rec: math.nan)  # fmt: skip
    assert per["task"] == [None]
    assert summary["task"] is None and summary["task_failed"] == 1


def test_metric_failures_are_told_and_a_metric_that_never_ran_is_an_error(tmp_path):
    """What eval and baseline print (the count, the first 3 messages) and raise (every example
    failed) from an evaluation's metrics.json."""
    from tunelab.evaluate.run import check_metric_ran, metric_failure_lines

    def meta(failing):
        def metric(prediction, reference, record):
            if record["index"] in failing:
                raise KeyError(f"field {record['index']}")
            return 1.0

        records = [{"index": i, "source": f"t.jsonl:{i + 1}"} for i in range(5)]
        _, summary = score_all(["a"] * 5, ["a"] * 5, records, names=["task"], user_metric=metric)  # fmt: skip
        return {"name": "ft", "examples": 5, "metric": "m.py:score", "metrics": summary}

    assert metric_failure_lines(meta(set())) == []
    check_metric_ran(meta(set()), tmp_path)
    assert metric_failure_lines(meta({1, 3})) == [
        "ft: your metric m.py:score failed on 2 of 5 examples (their task score is null):",
        "  #1 (t.jsonl:2): KeyError: 'field 1'",
        "  #3 (t.jsonl:4): KeyError: 'field 3'",
    ]
    check_metric_ran(meta({1, 3}), tmp_path)  # some scored: not an error
    every = meta(set(range(5)))
    lines = metric_failure_lines(every)
    assert lines[0] == "ft: your metric m.py:score failed on 5 of 5 examples (their task score is null):"  # fmt: skip
    assert lines[1:] == [
        "  #0 (t.jsonl:1): KeyError: 'field 0'",
        "  #1 (t.jsonl:2): KeyError: 'field 1'",
        "  #2 (t.jsonl:3): KeyError: 'field 2'",
        "  ... and 2 more (task_failures in metrics.json lists 5)",
    ]
    with pytest.raises(ConfigError) as e:
        check_metric_ran(every, tmp_path / "ft")
    assert str(e.value) == (
        "eval.metric 'm.py:score' failed on every example (5 of 5), e.g. #0 (t.jsonl:1): "
        f"KeyError: 'field 0'; the evaluation is written to {tmp_path / 'ft'} (task scores are "
        "null, the other metrics are kept): fix the function and evaluate again"
    )
    check_metric_ran({**every, "examples": 0}, tmp_path)  # nothing to score: nothing failed


def test_score_all_rejects_unknown_names_and_task_without_a_function():
    with pytest.raises(ConfigError, match="unknown"):
        score_all(["a"], ["a"], None, names=["meteor"])
    with pytest.raises(ConfigError, match="needs your function"):
        score_all(["a"], ["a"], None, names=["task"])
    with pytest.raises(ValueError, match="1 predictions but 2 records"):
        score_all(["a"], ["a"], [{}, {}], names=["exact_match"])


def test_contains_matches_whole_words_after_normalising():
    from tunelab.evaluate.metrics import contains

    assert contains("The capital of France is Paris.", "Paris") == 1.0
    assert contains("paris!", "Paris") == 1.0
    assert contains("Parisian food", "Paris") == 0.0
    assert contains("Seven plus five is 12.", "12") == 1.0
    assert contains("It is 120.", "12") == 0.0
    assert contains("anything", "  ") == 0.0
