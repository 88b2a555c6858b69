from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from rich.console import Console

from tunelab.data.read import Row, Source
from tunelab.data.records import Example, parse_examples
from tunelab.data.stats import compute_overlap, compute_stats, render_stats
from tunelab.data.tokenize import EncodeReport


def examples(rows: list[dict], file: str = "train.jsonl") -> list[Example]:
    return parse_examples([Row(Source(file, i + 1), r) for i, r in enumerate(rows)])


def alpaca(instruction: str, output: str = "ok", input: str | None = None) -> dict:
    row = {"instruction": instruction, "output": output}
    if input is not None:
        row["input"] = input
    return row


def stats_of(rows: list[dict], **kw):
    kw.setdefault("max_seq_len", None)
    kw.setdefault("truncation", "drop")
    return compute_stats(examples(rows), None, **kw)


VARIED = [
    alpaca(f"{verb} the {noun}.", f"answer {i}")
    for i, (verb, noun) in enumerate(
        (v, n)
        for v in ("Summarise", "Translate", "Classify", "Explain", "Rewrite")
        for n in ("paragraph", "email", "review", "poem")
    )
]


def test_formats_are_counted():
    rows = [
        alpaca("a", "b"),
        alpaca("c", "d"),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"text": "plain text"},
    ]
    s = stats_of(rows)
    assert s.records == 5
    assert s.formats == {"alpaca": 2, "chat": 1, "preference": 1, "text": 1}


def test_exact_and_near_duplicates_counted_exactly():
    rows = [
        alpaca("Summarise the text.", "A"),  # first
        alpaca("Summarise the text.", "A"),  # exact repeat of 1
        alpaca("summarise  the TEXT!", "A"),  # near (normalises like 1), not exact
        alpaca("Summarise the text 2.", "B"),  # near (digits stripped), other response
        alpaca("Summarise the text.", "B"),  # near: same instruction, other response
        alpaca("Translate the text.", "A"),  # new
        alpaca("summarise  the TEXT!", "A"),  # exact repeat of 3
        {"messages": [{"role": "user", "content": "Summarise the text."},
                      {"role": "assistant", "content": "A"}]},  # chat: other format -> near
    ]  # fmt: skip
    s = stats_of(rows)
    assert s.exact_duplicates == 2
    assert s.near_duplicate_instructions == 4


def test_diversity_warns_when_one_instruction_dominates():
    rows = [
        alpaca("Classify the sentiment of this review.", "pos", input=f"review {chr(97 + i)} text")
        for i in range(16)
    ]
    rows += VARIED[:4]  # 16 of 20 = 80 % share one instruction (inputs vary)
    s = stats_of(rows)
    assert s.diversity.top_instruction_share == pytest.approx(0.8)
    assert s.diversity.top_instruction == "Classify the sentiment of this review."
    assert s.diversity.warning is not None
    assert "80%" in s.diversity.warning
    assert "Classify the sentiment of this review." in s.diversity.warning
    assert "system prompt" in s.diversity.warning
    assert s.diversity.warning in s.warnings
    # the inputs differ, so these are neither exact nor near duplicates
    assert s.exact_duplicates == 0 and s.near_duplicate_instructions == 0


def test_diversity_warns_on_a_shared_opening():
    rows = [alpaca(f"Answer the question about topic {w}.", "x") for w in "abcdefghijklmnop"]
    s = stats_of(rows)
    assert s.diversity.top_instruction_share < 0.5
    assert s.diversity.top_opening == "answer the question"
    assert s.diversity.top_opening_share == 1.0
    assert s.diversity.warning is not None and '"answer the question"' in s.diversity.warning


def test_diversity_quiet_on_varied_data():
    s = stats_of(VARIED)
    assert s.records == 20
    assert s.diversity.distinct_instructions == 20
    assert s.diversity.distinct_ratio == 1.0
    assert s.diversity.top_opening_share == pytest.approx(0.05)  # "summarise the paragraph"
    assert s.diversity.warning is None
    assert s.warnings == []


def test_diversity_needs_ten_records():
    s = stats_of([alpaca("Same thing.", str(i)) for i in range(9)])
    assert s.diversity.top_instruction_share == 1.0
    assert s.diversity.warning is None


def test_estimated_lengths_and_drop_policy():
    rows = [alpaca("x" * 40, "y" * 40), alpaca("x" * 400, "y" * 3), alpaca("abc", "d")]
    s = stats_of(rows, max_seq_len=50, truncation="drop")
    assert not s.lengths_exact
    assert (s.length["min"], s.length["max"]) == (1, 101)  # ceil(4/4), ceil(403/4)
    assert s.over_limit == 1
    assert s.dropped == {"are longer than max_seq_len 50 (truncation: drop)": 1}
    assert s.kept == 2 and s.truncated == 0
    assert any("1 record exceeds" in w and "dropped" in w for w in s.warnings)


def test_estimated_truncate_prompt_drops_long_responses():
    rows = [alpaca("x" * 400, "y" * 4), alpaca("x" * 4, "y" * 400), alpaca("a", "b")]
    s = stats_of(rows, max_seq_len=50, truncation="truncate_prompt")
    assert s.over_limit == 2
    assert s.truncated == 1
    assert sum(s.dropped.values()) == 1 and s.kept == 2


def test_exact_report_is_used():
    exs = examples([alpaca("a", "b"), alpaca("c", "d"), alpaca("e", "f")])
    report = EncodeReport(
        examples=[],
        lengths=[10, 30, 20],
        truncated=0,
        dropped=Counter({"have no trained response token": 1}),
    )
    s = compute_stats(exs, report, max_seq_len=25, truncation="truncate")
    assert s.lengths_exact
    assert s.length == {"min": 10, "median": 20.0, "p95": 29.0, "max": 30, "mean": 20.0}
    assert s.over_limit == 1
    assert s.dropped == {"have no trained response token": 1}
    assert any("have no trained response token and will be dropped" in w for w in s.warnings)
    json.dumps(s.to_dict())  # plain JSON types


def test_overlap_counts():
    train = examples(
        [alpaca("What is 2+2?", "4"), alpaca("Name a colour.", "red"), alpaca("Hi", "hello")]
    )
    other = examples(
        [
            alpaca("What is 2+2?", "4"),  # exact
            alpaca("what is 3+3", "6"),  # other numbers: another prompt
            alpaca("Name a colour.", "blue"),  # same prompt
            alpaca("Something new", "x"),
        ],
        file="val.jsonl",
    )
    o = compute_overlap(train, other)
    assert (o.other_records, o.exact, o.same_prompt) == (4, 1, 2)
    assert o.examples == ["val.jsonl:1", "val.jsonl:3"]
    assert json.loads(json.dumps(o.to_dict()))["exact"] == 1


def test_render_mentions_everything():
    rows = [alpaca("Classify this.", "pos", input=f"text {i}") for i in range(12)] + [
        alpaca("x" * 800, "y")
    ]
    s = stats_of(rows, max_seq_len=100, truncation="drop")
    o = compute_overlap(examples(rows[:2]), examples(rows[:3], file="val.jsonl"))
    buf = io.StringIO()
    render_stats(s, o, Console(file=buf, width=200, color_system=None), title="train.jsonl [x]")
    out = buf.getvalue()
    for needle in (
        "train.jsonl [x]",
        "alpaca",
        "≈ chars/4; pass --model for exact counts",
        "max_seq_len 100, truncation: drop (over-long records will be dropped): 1 over the limit; 12 kept",
        "warning: 92% of records",
        "overlap with training data: 2 of 3 exact",
        "val.jsonl:1",
    ):
        assert needle in out, needle


def test_duplicates_counted_over_100k_records():
    # Speed is measured by bench/data_bench.py, not asserted here.
    base = examples(
        [alpaca(f"Question {i % 997}: what about item {i}?", f"answer {i}") for i in range(1000)]
    )
    exs = base * 100
    s = compute_stats(exs, None, max_seq_len=16, truncation="truncate")
    assert s.records == 100_000 and s.exact_duplicates == 99_000


def test_error_policy_with_report_drops_nothing():
    # `data check` encodes with "drop" to count, but reports what "error" would do.
    exs = examples([alpaca("a", "b"), alpaca("c", "d")])
    reason = "are longer than max_seq_len 8 (truncation: drop)"
    report = EncodeReport(examples=[], lengths=[4, 12], dropped=Counter({reason: 1}))
    s = compute_stats(exs, report, max_seq_len=8, truncation="error")
    assert s.over_limit == 1 and s.dropped == {} and s.kept == 2
    assert s.warnings == [
        "1 record exceeds max_seq_len 8 and will stop the run with an error (truncation: error)"
    ]


# -- preference and KTO data -------------------------------------------------------------------
def pair(chosen: str, rejected: str, prompt: str = "q") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def kto(tag: bool, i: int = 0) -> dict:
    return {"instruction": f"q{i}", "output": f"a{i}", "kto_tag": tag}


def test_length_bias_of_preference_pairs_is_reported():
    biased = stats_of([pair("a long and detailed answer", "short", f"q{i}") for i in range(8)]
                      + [pair("no", "a longer wrong answer", "q9"), pair("ok", "also longer", "q10")])  # fmt: skip
    p = biased.preferences
    assert p.pairs == 10 and p.chosen_longer == 0.8 and p.chosen_chars > p.rejected_chars
    assert any(
        "length bias: the chosen answer is the longer one in 80% of pairs" in w
        for w in biased.warnings
    )
    balanced = stats_of([pair("a longer answer", "no", f"q{i}") for i in range(5)]
                        + [pair("ok", "a longer answer", f"r{i}") for i in range(5)])  # fmt: skip
    assert balanced.preferences.chosen_longer == 0.5
    assert not any("length bias" in w for w in balanced.warnings)
    shorter = stats_of([pair("no", "a longer answer", f"q{i}") for i in range(4)])
    assert any("the shorter one in 100%" in w for w in shorter.warnings)


def test_kto_balance_is_reported():
    one_kind = stats_of([kto(True, i) for i in range(6)])
    assert (one_kind.preferences.desirable, one_kind.preferences.undesirable) == (6, 0)
    assert any("no undesirable (kto_tag false) examples" in w for w in one_kind.warnings)
    lopsided = stats_of([kto(True, i) for i in range(9)] + [kto(False, 10 + i) for i in range(3)])
    assert any("KTO balance: 9 desirable vs 3 undesirable" in w for w in lopsided.warnings)
    assert any("(e.g. undesirable_weight 3.00)" in w for w in lopsided.warnings)
    fewer = stats_of([kto(True, i) for i in range(3)] + [kto(False, 10 + i) for i in range(6)])
    assert any("KTO balance: 3 desirable vs 6 undesirable" in w and "desirable_weight 2.00" in w
               for w in fewer.warnings)  # fmt: skip
    even = stats_of([kto(True, i) for i in range(4)] + [kto(False, 10 + i) for i in range(4)])
    assert not any("KTO" in w for w in even.warnings)


def test_preferences_reach_the_report_and_json():
    s = stats_of([pair("a long and detailed answer", "short", f"q{i}") for i in range(4)])
    out = io.StringIO()
    render_stats(s, None, Console(file=out, width=200), title="pairs.jsonl")
    assert "preference pairs: 4; the chosen answer is the longer one in 100%" in out.getvalue()
    assert json.loads(json.dumps(s.to_dict()))["preferences"]["pairs"] == 4
