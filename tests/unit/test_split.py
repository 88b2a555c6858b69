from __future__ import annotations

import json

import pytest

from tunelab.data.read import Row, Source
from tunelab.data.records import Example, parse_examples
from tunelab.data.split import (
    normalize,
    split_examples,
    split_indices,
    write_jsonl_atomic,
    write_jsonl_atomic_many,
    write_splits,
)
from tunelab.errors import ConfigError, DataError


def rows_of(records: list[dict], file: str = "data.jsonl") -> list[Row]:
    return [Row(Source(file, i + 1), r) for i, r in enumerate(records)]


def examples(records: list[dict]) -> list[Example]:
    return parse_examples(rows_of(records))


def distinct(n: int) -> list[Example]:
    return examples(
        [
            {"instruction": f"question {chr(97 + i % 26)}{i // 26 * 'z'} {i}", "output": "a"}
            for i in range(n)
        ]
    )


def words(n: int) -> list[Example]:
    # prompts that stay distinct after normalisation (digits are stripped)
    return examples(
        [
            {"instruction": "q " + "".join(chr(97 + int(d)) for d in str(i)), "output": "a"}
            for i in range(n)
        ]
    )


def test_normalize():
    assert normalize("  What's   2+2?\n") == "whats 22"  # numbers make prompts different
    assert normalize("  What's   2+2?\n", digits=False) == "whats"
    assert normalize("Hello, World 42!", digits=False) == normalize("hello world")
    assert normalize("What is 7 + 5?") != normalize("What is 8 + 2?")


def test_same_seed_same_split_other_seed_other_split():
    exs = words(200)
    a = split_indices(exs, (0.7, 0.15, 0.15), seed=1)
    assert a == split_indices(exs, (0.7, 0.15, 0.15), seed=1)
    assert a != split_indices(exs, (0.7, 0.15, 0.15), seed=2)
    # a partition of all indices, each split in file order
    assert sorted(i for part in a for i in part) == list(range(200))
    assert all(part == sorted(part) for part in a)


def test_split_examples_matches_indices():
    exs = words(50)
    parts = split_examples(exs, (0.8, 0.2), seed=3)
    idx = split_indices(exs, (0.8, 0.2), seed=3)
    assert [[exs.index(e) for e in part] for part in parts] == idx


@pytest.mark.parametrize(
    "ratios", [(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.9, 0.1), (0.333, 0.333, 0.334)]
)
def test_ratios_respected(ratios):
    exs = words(1000)
    sizes = [len(p) for p in split_indices(exs, ratios, seed=0)]
    for size, r in zip(sizes, ratios, strict=True):
        assert abs(size - r * 1000) <= 1, (sizes, ratios)


def test_duplicates_and_near_duplicates_never_cross_splits():
    records = []
    for i in range(300):
        key = "q " + "".join(chr(97 + int(d)) for d in str(i % 60))
        variant = [key, key.upper() + "!", f"  {key}  ?"][i % 3]  # same normalised prompt
        records.append({"instruction": variant, "output": str(i)})
    exs = examples(records)
    for seed in range(5):
        parts = split_indices(exs, (0.7, 0.15, 0.15), seed=seed)
        where = {}
        for k, part in enumerate(parts):
            for i in part:
                where.setdefault(normalize(exs[i].prompt_key), set()).add(k)
        assert len(where) == 60
        assert all(len(s) == 1 for s in where.values())
        assert all(parts)


def test_big_duplicate_group_does_not_empty_a_split():
    records = [{"instruction": "same", "output": "a"}] * 8 + [
        {"instruction": "other", "output": "b"},
        {"instruction": "third", "output": "c"},
    ]
    for seed in range(10):
        parts = split_indices(examples(records), (0.7, 0.15, 0.15), seed=seed)
        assert all(parts), (seed, parts)


def test_too_few_records_error_has_numbers():
    with pytest.raises(DataError) as e:
        split_indices(distinct(3), (0.7, 0.15, 0.15), seed=0)
    msg = str(e.value)
    assert msg.startswith("data.jsonl: 3 records (3 distinct prompts) cannot fill 3 splits")
    assert "0.7/0.15/0.15" in msg
    assert "val split would be empty" in msg
    assert "need at least 6 records" in msg
    split_indices(distinct(6), (0.7, 0.15, 0.15), seed=0)  # and 6 is enough


def test_too_few_distinct_prompts_error():
    records = [{"instruction": "same", "output": "a"}] * 10 + [
        {"instruction": "Same!", "output": "b"}
    ] * 10
    with pytest.raises(
        DataError, match=r"20 records \(1 distinct prompts\).*need at least 3 distinct"
    ):
        split_indices(examples(records), (0.7, 0.15, 0.15), seed=0)


@pytest.mark.parametrize(
    "ratios", [(0.7, 0.2, 0.2), (0.5, 0.6, -0.1), (1.0, 0.0), (), (float("nan"), 1.0)]
)
def test_bad_ratios(ratios):
    with pytest.raises(ConfigError, match="split ratios"):
        split_indices(distinct(10), ratios, seed=0)


def test_write_splits_writes_original_fields(tmp_path):
    records = [
        {"question": f"q {chr(97 + i)}", "positive_answer": "y", "negative_answer": "n", "id": i}
        for i in range(20)
    ]
    rows = rows_of(records)
    exs = parse_examples(rows)
    parts = split_indices(exs, (0.5, 0.25, 0.25), seed=0)
    paths = write_splits(rows, parts, tmp_path / "out")
    assert [p.name for p in paths] == ["train.jsonl", "val.jsonl", "test.jsonl"]
    for path, part in zip(paths, parts, strict=True):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == [records[i] for i in part]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "train.jsonl"
    with pytest.raises(TypeError):
        write_jsonl_atomic(target, [{"a": 1}, {"b": {1, 2}}])
    assert list(tmp_path.iterdir()) == []
    # an existing file is left untouched
    target.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl_atomic(target, [{"b": {1}}])
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_multi_file_write_renames_none_when_one_fails(tmp_path):
    with pytest.raises(TypeError):
        write_jsonl_atomic_many(
            [(tmp_path / "train.jsonl", [{"a": 1}]), (tmp_path / "val.jsonl", [{"b": {2}}])]
        )
    assert list(tmp_path.iterdir()) == []
    write_jsonl_atomic_many(
        [(tmp_path / "train.jsonl", [{"a": "é"}]), (tmp_path / "val.jsonl", [])]
    )
    assert (tmp_path / "train.jsonl").read_text(encoding="utf-8") == '{"a": "é"}\n'
    assert (tmp_path / "val.jsonl").read_text() == ""
