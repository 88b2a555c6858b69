"""The blind human-rating sheet and its key."""

import csv

import pytest

from tunelab.errors import DataError
from tunelab.evaluate.sheet import letters, read_ratings, write_rating_sheet

N = 12
PROMPTS = [f'question {i}, with a comma and "quotes"\nand a newline — ü' for i in range(N)]
REFERENCES = [f"reference {i}" for i in range(N)]
SYSTEMS = {
    "base": [f"base answer {i}" for i in range(N)],
    "k-shot": [f"k-shot answer {i}" for i in range(N)],
    "fine-tuned": [f"fine-tuned answer {i}" for i in range(N)],
}


def _rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _fill(sheet, ratings_by_row):
    """Write ratings into the sheet the way a rater would (by row, per letter)."""
    with open(sheet, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    for row, ratings in zip(rows[1:], ratings_by_row, strict=True):
        for letter, value in ratings.items():
            row[header.index(f"rating_{letter}")] = value
    with open(sheet, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows(rows)


def test_letters():
    assert letters(3) == ["A", "B", "C"]
    assert letters(28)[25:] == ["Z", "AA", "AB"]


def test_the_sheet_is_blind_in_rows_and_columns(tmp_path):
    sheet, key = write_rating_sheet(tmp_path / "human", PROMPTS, REFERENCES, SYSTEMS, seed=0)
    assert (sheet.name, key.name) == ("rating_sheet.csv", "rating_key.csv")
    rows, keys = _rows(sheet), {r["item"]: r for r in _rows(key)}
    assert list(rows[0]) == [
        "item", "prompt", "reference", "answer_A", "answer_B", "answer_C",
        "rating_A", "rating_B", "rating_C", "notes",
    ]  # fmt: skip
    items = [int(r["item"]) for r in rows]
    assert sorted(items) == list(range(1, N + 1)) and items != sorted(items)  # rows shuffled
    assert [int(k) for k in keys] == list(range(1, N + 1))  # the key is in item order

    seen = {letter: set() for letter in "ABC"}
    for row in rows:
        i = int(row["item"]) - 1
        assert row["prompt"] == PROMPTS[i] and row["reference"] == REFERENCES[i]
        assert row["rating_A"] == row["rating_B"] == row["rating_C"] == row["notes"] == ""
        for letter in "ABC":
            system = keys[row["item"]][letter]
            assert row[f"answer_{letter}"] == SYSTEMS[system][i]  # the key un-blinds it
            seen[letter].add(system)
        assert sorted(keys[row["item"]][c] for c in "ABC") == sorted(SYSTEMS)
    assert all(names == set(SYSTEMS) for names in seen.values())  # no letter means one system
    # no system sits behind the same letter in every row
    assert len({tuple(keys[r["item"]][c] for c in "ABC") for r in rows}) > 1


def test_same_seed_same_files_other_seed_other_order(tmp_path):
    a = write_rating_sheet(tmp_path / "a", PROMPTS, REFERENCES, SYSTEMS, seed=3)
    b = write_rating_sheet(tmp_path / "b", PROMPTS, REFERENCES, SYSTEMS, seed=3)
    c = write_rating_sheet(tmp_path / "c", PROMPTS, REFERENCES, SYSTEMS, seed=4)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert not [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp")]


def test_read_ratings_unblinds_the_filled_sheet(tmp_path):
    sheet, key = write_rating_sheet(tmp_path, PROMPTS, REFERENCES, SYSTEMS, seed=1)
    score = {"base": 2, "k-shot": 5, "fine-tuned": 8}
    keys = {r["item"]: r for r in _rows(key)}
    filled = []
    for row in _rows(sheet):
        item = int(row["item"])
        ratings = {c: str(score[keys[row["item"]][c]] + item / 100) for c in "ABC"}
        if item == 4:  # the rater skipped one answer
            skipped = next(c for c in "ABC" if keys[row["item"]][c] == "k-shot")
            ratings[skipped] = " "
        filled.append(ratings)
    _fill(sheet, filled)

    ratings = read_ratings(sheet, key)
    assert set(ratings) == set(SYSTEMS)
    assert ratings["base"] == [2 + i / 100 for i in range(1, N + 1)]  # in item order
    assert ratings["fine-tuned"] == [8 + i / 100 for i in range(1, N + 1)]
    assert ratings["k-shot"] == [5 + i / 100 for i in range(1, N + 1) if i != 4]
    aligned = read_ratings(sheet, key, keep_missing=True)
    assert aligned["k-shot"][3] is None and len(aligned["k-shot"]) == N


def test_a_rating_that_is_not_a_number_is_reported_with_its_cell(tmp_path):
    sheet, key = write_rating_sheet(tmp_path, PROMPTS[:2], REFERENCES[:2], two_systems(2))
    _fill(sheet, [{"A": "good"}, {"B": "nan"}])
    with pytest.raises(DataError) as e:
        read_ratings(sheet, key)
    assert [(p.line, p.field) for p in e.value.problems] == [(2, "rating_A"), (3, "rating_B")]
    assert "not a number: 'good'" in str(e.value)


def two_systems(n):
    return {"x": [f"x{i}" for i in range(n)], "y": [f"y{i}" for i in range(n)]}


def test_unequal_lengths_are_a_data_error_naming_each(tmp_path):
    systems = {"base": ["a", "b", "c"], "tuned": ["a", "b"]}
    with pytest.raises(DataError) as e:
        write_rating_sheet(tmp_path, ["p1", "p2", "p3"], ["r1", "r2"], systems)
    assert [p.field for p in e.value.problems] == ["references", "systems.tuned"]
    assert "2 answers for 3 prompts" in str(e.value)
    with pytest.raises(DataError, match="no systems"):
        write_rating_sheet(tmp_path, ["p1"], ["r1"], {})
    assert list(tmp_path.iterdir()) == []


def test_references_may_be_absent(tmp_path):
    sheet, _ = write_rating_sheet(tmp_path, ["p1", "p2"], None, two_systems(2))
    assert [r["reference"] for r in _rows(sheet)] == ["", ""]
