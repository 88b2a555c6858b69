"""Paired bootstrap, flips, reading evaluation folders, and the comparison report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.compare import (
    compare,
    flips,
    format_table,
    load_eval,
    paired_bootstrap,
    write_report,
)

# --- statistics ------------------------------------------------------------------------------


def test_a_constant_difference_has_a_zero_width_interval():
    a = [0, 3, 1, 7, 2, 2, 5]
    b = [x + 1 for x in a]
    assert paired_bootstrap(a, b) == (1.0, 1.0, 1.0)
    assert paired_bootstrap(b, a) == (-1.0, -1.0, -1.0)
    assert paired_bootstrap(a, a, resamples=10) == (0.0, 0.0, 0.0)


def test_the_interval_covers_the_true_mean_and_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (400, 1600):
        a = rng.normal(0.0, 1.0, n)
        b = a + rng.normal(0.3, 1.0, n)  # true mean difference 0.3, sd 1
        mean, lo, hi = paired_bootstrap(a, b, resamples=4000, seed=0)
        assert mean == pytest.approx(np.mean(b - a))
        assert lo < 0.3 < hi and lo < mean < hi
        # the normal-theory 95 % interval of a mean: 2 * 1.96 * sd / sqrt(n)
        assert hi - lo == pytest.approx(2 * 1.96 * np.std(b - a) / np.sqrt(n), rel=0.1)
        widths[n] = hi - lo
    assert widths[1600] / widths[400] == pytest.approx(0.5, rel=0.15)


def test_the_bootstrap_is_deterministic_for_a_seed_and_pairs_the_examples():
    a = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 1, 1, 1, 0, 1, 1, 0, 1, 1]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    x, y = np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 2
    assert paired_bootstrap(x, y, seed=3) == paired_bootstrap(x, y, seed=3)
    assert paired_bootstrap(x, y, seed=3) != paired_bootstrap(x, y, seed=4)
    mean, lo, hi = paired_bootstrap(a, b)
    assert mean == pytest.approx(0.2)
    # only two examples differ, both in b's favour: no resample can make the difference negative
    assert 0.0 <= lo <= mean <= hi <= 0.6
    assert paired_bootstrap(a, b, confidence=0.5)[1] >= lo  # a narrower interval


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1], [1], confidence=1.0)


def test_flips():
    assert flips([1, 1, 0, 0, 1], [1, 0, 1, 1, 0]) == (2, 2)
    assert flips([1, 0, 0, 1], [1, 1, 1, 0]) == (1, 2)
    assert flips([0.2, 0.8], [0.6, 0.4]) == (1, 1)  # threshold 0.5
    assert flips([0.2, 0.8], [0.6, 0.4], threshold=0.9) == (0, 0)


# --- evaluation folders ----------------------------------------------------------------------


def _record(i, prediction, reference="R", **scores):
    return {"index": i, "source": f"test.jsonl:{i + 1}", "prompt": f"question {i}", "reference": reference, "prediction": prediction, "scores": scores}  # fmt: skip


def _write_eval(root, name, records, **metrics):
    folder = root / name
    folder.mkdir(parents=True)
    meta = {"name": name, "model": "tiny", "adapter": None, "data": "test.jsonl", "shots": 0, "examples": len(records), "metrics": metrics, "seconds": 1.0}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(meta))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_load_eval_reads_a_folder(tmp_path):
    folder = _write_eval(tmp_path, "base", [_record(0, "A", exact_match=1.0), _record(1, "B", exact_match=0.0, judge=None)], loss=1.5)  # fmt: skip
    run = load_eval(folder)
    assert run.name == "base" and run.meta["metrics"] == {"loss": 1.5} and run.folder == folder
    assert [r["prediction"] for r in run.records] == ["A", "B"]


@pytest.mark.parametrize(
    ("metrics_json", "lines", "message"),
    [
        (None, None, r"ghost: not an evaluation folder"),
        ("", [], r"metrics\.json: file not found"),
        ('{"name": "x",\n"metrics": }', [], r"metrics\.json:2: not valid JSON"),
        ("[1]", [], r"metrics\.json: expected a JSON object"),
        ("{}", None, r"predictions\.jsonl: file not found"),
        ("{}", [], r"predictions\.jsonl: no predictions"),
        (
            "{}",
            ["{}", "", "not json"],
            r"predictions\.jsonl:1: missing 'index'\n.*predictions\.jsonl:3: invalid JSON",
        ),  # fmt: skip
        (
            "{}",
            ['{"index": "0", "source": "s", "reference": "r", "prediction": "p", "scores": {}}'],
            r":1: 'index' should be a integer",
        ),  # fmt: skip
        (
            "{}",
            ['{"index": 0, "source": "s", "reference": "r", "prediction": "p"}'],
            r":1: missing 'scores'",
        ),  # fmt: skip
        (
            "{}",
            [
                '{"index": 0, "source": "s", "reference": "r", "prediction": "p", "scores": {"bleu": "high"}}'
            ],
            r":1: scores\.bleu: 'high' is not a number",
        ),  # fmt: skip
        (
            "{}",
            [
                '{"index": 0, "source": "s", "reference": "r", "prediction": "p", "scores": {"ok": true}}'
            ],
            r":1: scores\.ok: True is not a number",
        ),  # fmt: skip
        (
            "{}",
            ['{"index": 0, "source": "s", "reference": "r", "prediction": "p", "scores": {}}'] * 2,
            r"predictions\.jsonl:2: example s #0 appears twice",
        ),  # fmt: skip
    ],
)
def test_load_eval_errors_name_the_file_and_line(tmp_path, metrics_json, lines, message):
    folder = tmp_path / "ghost"
    if metrics_json is not None:
        folder.mkdir()
        if metrics_json:
            (folder / "metrics.json").write_text(metrics_json)
        if lines is not None:
            (folder / "predictions.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        load_eval(folder)


# --- comparing -------------------------------------------------------------------------------


@pytest.fixture
def three_runs(tmp_path):
    """Zero-shot, 3-shot and fine-tuned on five shared examples; each has one of its own."""

    def right(i, ok, **more):
        return _record(i, "R" if ok else f"wrong {i}", exact_match=float(ok), **more)

    base = [right(i, ok, rougeL=0.5) for i, ok in enumerate([1, 0, 0, 0, 1])]
    base.append(right(9, 1, rougeL=1.0))  # only the baseline has example 9
    kshot = [right(i, ok, rougeL=0.6) for i, ok in enumerate([1, 1, 0, 0, 1])]
    tuned = [right(i, ok, rougeL=0.9, task=t) for i, (ok, t) in enumerate(zip([1, 1, 1, 0, 0], [1.0, 1.0, None, 0.0, 0.5], strict=True))]  # fmt: skip
    for run in (base, kshot, tuned):  # one test file: the same prompt in every evaluation
        run[1]["prompt"] = "<script>alert('x')</script> & more"
    tuned[1]["prediction"] = "</pre><img src=x onerror=alert(1)>"
    tuned.append(right(7, 0))  # only the fine-tune has example 7
    return [
        _write_eval(tmp_path, "base-0shot", base, exact_match=0.5, bleu=12.5, loss=2.0),
        _write_eval(tmp_path, "base-3shot", kshot, exact_match=0.6, loss=1.8),
        _write_eval(tmp_path, "finetuned", tuned, exact_match=0.5, loss=0.9, perplexity=2.46),
    ]


def test_compare_aligns_and_computes_every_row(three_runs):
    c = compare([load_eval(f) for f in three_runs], resamples=2000)
    assert c.aligned == 5 and c.dropped == [1, 0, 1]
    assert any("5 examples are in every evaluation" in n and "base-0shot: 1, finetuned: 1" in n for n in c.notes)  # fmt: skip
    rows = {r.metric: r for r in c.rows}
    assert list(rows) == ["exact_match", "task", "rougeL", "bleu (corpus)", "loss", "perplexity"]

    em = rows["exact_match"]
    assert em.n == 5 and em.values == pytest.approx([0.4, 0.6, 0.6])
    assert em.deltas[0] is None
    assert em.deltas[1].mean == pytest.approx(0.2)
    assert (em.deltas[1].wrong_to_right, em.deltas[1].right_to_wrong) == (1, 0)
    assert (em.deltas[2].wrong_to_right, em.deltas[2].right_to_wrong) == (2, 1)
    assert em.deltas[2].lo <= em.deltas[2].mean <= em.deltas[2].hi

    # only the fine-tune has a task metric, with one failed example: no baseline to compare to
    task = rows["task"]
    assert task.n == 4 and task.values[:2] == [None, None] and task.values[2] == pytest.approx(2.5 / 4)  # fmt: skip
    assert task.deltas == [None, None, None]
    assert any(n.startswith("task: 1 of the 5 common examples lack a score") for n in c.notes)

    assert rows["rougeL"].deltas[2].mean == pytest.approx(0.4)
    assert rows["rougeL"].deltas[2].wrong_to_right is None  # not a right-or-wrong metric
    assert rows["bleu (corpus)"].values == [12.5, None, None] and rows["bleu (corpus)"].n is None
    assert rows["loss"].values == [2.0, 1.8, 0.9]


def test_compare_picks_the_instructive_examples(three_runs):
    c = compare([load_eval(f) for f in three_runs], main_metric="exact_match", resamples=100)
    assert c.main_metric == "exact_match" and c.best_index == 1  # first of the tied best
    assert [e.index for e in c.fixed] == [1] and c.broken == []
    c = compare([load_eval(f) for f in three_runs], main_metric="rougeL", resamples=100)
    assert c.best_index == 2 and [e.index for e in c.fixed] == [0, 1, 2, 3, 4]
    assert c.fixed[1].predictions[2] == "</pre><img src=x onerror=alert(1)>"
    with pytest.raises(ConfigError, match="'judge' has no per-example scores"):
        compare([load_eval(f) for f in three_runs], main_metric="judge")


def test_broken_examples_are_ordered_by_the_loss_and_ties_prefer_where_others_agree(tmp_path):
    base = [_record(i, "x", exact_match=1.0, rougeL=1.0) for i in range(4)]
    kshot = [_record(i, "x", exact_match=1.0, rougeL=r) for i, r in enumerate([1.0, 0.2, 1.0, 1.0])]  # fmt: skip
    tuned = [_record(i, "y", exact_match=0.0, rougeL=r) for i, r in enumerate([0.9, 0.5, 0.5, 0.1])]  # fmt: skip
    runs = [load_eval(_write_eval(tmp_path, n, r)) for n, r in [("a", base), ("b", kshot), ("c", tuned)]]  # fmt: skip
    c = compare(runs, main_metric="rougeL", resamples=100)
    assert c.best_index == 1
    assert [e.index for e in c.broken] == [1]
    c = compare([runs[0], runs[2]], main_metric="rougeL", resamples=100)
    assert [e.index for e in c.broken] == [3, 1, 2, 0]
    # exact_match: every fixed example differs by 1; first those the 3-shot run also got wrong
    base = [_record(i, "x", exact_match=0.0) for i in range(3)]
    kshot = [_record(i, "x", exact_match=e) for i, e in enumerate([1.0, 0.0, 0.0])]
    tuned = [_record(i, "x", exact_match=1.0) for i in range(3)]
    runs = [load_eval(_write_eval(tmp_path / "em", n, r)) for n, r in [("a", base), ("b", kshot), ("c", tuned)]]  # fmt: skip
    c = compare(runs, resamples=100)
    assert c.best_index == 2 and [e.index for e in c.fixed] == [1, 2, 0]


def test_compare_errors(tmp_path, three_runs):
    runs = [load_eval(f) for f in three_runs]
    with pytest.raises(ConfigError, match="at least two"):
        compare(runs[:1])
    with pytest.raises(ConfigError, match="baseline_index 5"):
        compare(runs, baseline_index=5)
    other = load_eval(_write_eval(tmp_path / "x", "other", [{**_record(0, "R"), "prompt": "another question"}]))  # fmt: skip
    with pytest.raises(DataError, match="no example in common"):
        compare([runs[0], other])


def test_the_same_test_file_aligns_however_its_path_was_spelled(tmp_path):
    """Examples align by content (prompt_hash, and an occurrence count for exact duplicates),
    never by the path the command was given (relative here, absolute there)."""

    def records(source, predictions):
        out = []
        for i, p in enumerate(predictions):
            r = _record(i, p, reference=f"R{i}", exact_match=float(p == f"R{i}"))
            r.update(source=f"{source}:{i + 1}", prompt="same question" if i in (1, 3) else f"q{i}")  # fmt: skip
            r["prompt_hash"] = "dup" if i in (1, 3) else f"h{i}"
            out.append(r)
        return out

    base = _write_eval(tmp_path, "base", records("data/test.jsonl", ["R0", "x", "x", "R3"]))
    tuned = _write_eval(tmp_path, "tuned", records("/home/me/proj/data/test.jsonl", ["R0", "R1", "R2", "x"]))  # fmt: skip
    c = compare([load_eval(base), load_eval(tuned)], resamples=100)
    assert c.aligned == 4 and c.dropped == [0, 0] and c.notes == []
    em = c.rows[0]
    assert em.metric == "exact_match" and em.values == [0.5, 0.75]
    # the duplicates (#1 and #3) paired in file order: #1 fixed, #3 broken
    assert (em.deltas[1].wrong_to_right, em.deltas[1].right_to_wrong) == (2, 1)
    assert [e.index for e in c.fixed] == [1, 2] and [e.index for e in c.broken] == [3]
    assert c.broken[0].predictions == ["R3", "x"] and c.broken[0].reference == "R3"


def test_older_files_fall_back_to_the_prompt_text_then_to_source_and_index(tmp_path):
    def records(source, with_hash=True, with_prompt=True):
        out = []
        for i in range(3):
            r = {**_record(i, "R", exact_match=1.0), "source": f"{source}:{i + 1}"}
            if with_hash:
                r["prompt_hash"] = f"h{i}"
            if not with_prompt:
                del r["prompt"]
            out.append(r)
        return out

    new = load_eval(_write_eval(tmp_path, "new", records("/abs/test.jsonl")))
    old = load_eval(_write_eval(tmp_path, "old", records("test.jsonl", with_hash=False)))
    assert compare([new, old], resamples=10).aligned == 3  # by prompt text: no prompt_hash in old
    oldest = load_eval(_write_eval(tmp_path, "oldest", records("test.jsonl", with_hash=False, with_prompt=False)))  # fmt: skip
    assert compare([old, oldest], resamples=10).aligned == 3  # by (source, index)
    with pytest.raises(DataError, match="no example in common"):
        compare([new, oldest], resamples=10)  # the old key: the paths differ
    bad = _write_eval(tmp_path, "bad", [{**_record(0, "R"), "prompt_hash": 12}])
    with pytest.raises(DataError, match=r"predictions\.jsonl:1: 'prompt_hash' should be a string"):
        load_eval(bad)


def test_different_references_are_refused_unless_allowed(tmp_path, three_runs):
    """The test file changed between two evaluations: the same question, another reference."""
    runs = [load_eval(f) for f in three_runs]
    changed = [{**r, "reference": "R2"} if r["index"] in (2, 4) else r for r in runs[2].records]
    runs[2] = load_eval(_write_eval(tmp_path / "changed", "finetuned", changed))
    with pytest.raises(DataError) as e:
        compare(runs, resamples=10)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'changed' / 'finetuned'}: 2 of the 5 examples it shares with the baseline base-0shot ({three_runs[0]}) have a different reference")  # fmt: skip
    assert "e.g. test.jsonl:3 ('question 2'): base-0shot has 'R', finetuned has 'R2'" in message
    assert "--allow-different-references" in message and "base-3shot" not in message
    c = compare(runs, resamples=10, allow_different_references=True)
    assert c.aligned == 5
    assert "2 common examples have different references in different evaluations" in c.notes


def test_the_test_files_are_told_apart_by_content_not_by_path(tmp_path):
    def run(name, data, sha):
        folder = _write_eval(tmp_path, name, [_record(0, "R", exact_match=1.0)])
        meta = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**meta, "data": data, "data_sha256": sha}))
        return load_eval(folder)

    a, b = run("a", "test.jsonl", "ab" * 32), run("b", "/abs/test.jsonl", "ab" * 32)
    assert compare([a, b], resamples=10).notes == []
    c = compare([a, run("c", "test.jsonl", "cd" * 32)], resamples=10)
    assert c.notes == ["the evaluations' test files differ in content: a: test.jsonl (abababababab), c: test.jsonl (cdcdcdcdcdcd)"]  # fmt: skip
    # older evaluations, without data_sha256: the paths, resolved against the current folder
    here = str(Path("test.jsonl").resolve())
    assert compare([run("d", "test.jsonl", None), run("e", here, None)], resamples=10).notes == []
    c = compare([run("f", "test.jsonl", None), run("g", "other.jsonl", None)], resamples=10)
    assert c.notes == ["the evaluations name different data files: other.jsonl, test.jsonl"]


def test_same_names_are_told_apart(three_runs):
    c = compare([load_eval(three_runs[0]), load_eval(three_runs[0])], resamples=100)
    assert [r.name for r in c.runs] == ["base-0shot", "base-0shot (2)"]
    assert c.rows[0].deltas[1].mean == 0.0


# --- reports ---------------------------------------------------------------------------------


def test_the_report_is_written_escaped_and_atomic(tmp_path, three_runs):
    c = compare([load_eval(f) for f in three_runs], resamples=500)
    out = tmp_path / "report"
    md, page = write_report(c, out)
    assert (md, page) == (out / "compare.md", out / "compare.html")
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.md"]  # no temp files

    text = md.read_text()
    assert "| metric | n | base-0shot | base-3shot | Δ vs base-0shot [95% CI] | fixed / broken | finetuned |" in text  # fmt: skip
    assert re.search(r"\| exact_match \| 5 \| 0\.400 \| 0\.600 \| \+0\.200 \[[-+]\d\.\d{3}, [-+]\d\.\d{3}\] \| 1 / 0 \|", text)  # fmt: skip
    assert (
        "## Fixed: better in finetuned than in base-0shot on task" not in text
    )  # baseline lacks task
    assert "## Fixed: better in base-3shot than in base-0shot on exact_match" in text
    assert "**prompt**: `<script>alert('x')</script> & more`" in text  # Markdown keeps the text
    assert "## Broken: worse in base-3shot than in base-0shot on exact_match\n\nNone.\n" in text

    page_text = page.read_text()
    assert "<script>" not in page_text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page_text  # fmt: skip
    assert "<img src=x" not in page_text and "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in page_text  # fmt: skip
    assert re.search(r'<img alt="[^"]*" src="data:image/png;base64,iVBORw0KGgo', page_text)
    assert "<td>+0.200 [" in page_text


def test_format_table_lines_up(three_runs):
    text = format_table(compare([load_eval(f) for f in three_runs], resamples=100))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["metric", "n", "base-0shot", "base-3shot", "Δ"]
    header, rule, exact = lines[0], lines[1], lines[2]
    assert exact.startswith("exact_match  ") and set(rule) <= {"-", " "}
    for name, value in (("base-0shot", "0.400"), ("base-3shot", "0.600"), ("finetuned", "0.600 ")):
        # right-aligned: each value ends where its column's header ends
        assert header.index(name) + len(name) == exact.index(value, header.index(name)) + 5
    assert "best on exact_match: base-3shot" in text
    assert "paired bootstrap 95% interval (100 resamples)" in text
