"""The `tunelab data` commands: bad input exits 2 with file:line:field, no traceback, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("malformed.jsonl", "malformed.jsonl:3: invalid JSON"),
        ("missing_field.jsonl", "missing_field.jsonl:2: output: missing"),
        ("bad_role.jsonl", "bad_role.jsonl:2: messages[1].role: 'bot' is not a role (expected one of: system, user, assistant)"),
        ("ends_with_user.jsonl", "ends_with_user.jsonl:1: messages: the conversation ends with a user message"),
        ("empty.jsonl", "empty.jsonl: the file has no records"),
        ("latin1.jsonl", "latin1.jsonl:2: not valid UTF-8 at byte offset"),
        ("bad_kto.jsonl", "bad_kto.jsonl:2: kto_tag: expected true or false, got 'maybe'"),
        ("pref_missing.jsonl", "pref_missing.jsonl:1: rejected: missing"),
    ],
)  # fmt: skip
def test_bad_files(capsys, name, expected):
    code, out, err = run(capsys, "data", "check", str(EXAMPLES / "bad" / name))
    assert code == 2
    assert expected in err.replace("\n", " ") or expected in err
    assert "Traceback" not in err + out


def test_bad_role_line_is_exact(capsys):
    # The shipped file puts the bad role on line 2 (the helper that made it says so; verify).
    lines = (EXAMPLES / "bad" / "bad_role.jsonl").read_text().splitlines()
    assert '"bot"' in lines[1]


def test_bom_and_blank_lines_pass(capsys):
    code, out, _ = run(capsys, "data", "check", str(EXAMPLES / "bad" / "bom_blank.jsonl"), "--json")
    assert code == 0 and json.loads(out)["records"] == 3


def test_error_is_printed_without_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"instruction": "x", "ouput": "y"}\n')
    r = subprocess.run(
        [sys.executable, "-m", "tunelab", "data", "check", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert f"{bad}:1: output: missing" in r.stderr and "Traceback" not in r.stderr
    assert tree(tmp_path) == {"d.jsonl"}


def test_check_json_statistics(capsys):
    code, out, _ = run(capsys, "data", "check", str(EXAMPLES / "repetitive.jsonl"), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["records"] == 60 and stats["formats"] == {"alpaca": 60}
    assert stats["lengths_exact"] is False
    assert stats["diversity"]["warning"] and stats["diversity"][
        "top_instruction_share"
    ] == pytest.approx(0.9)


def test_check_with_tokenizer_counts_over_limit(capsys, tmp_path, monkeypatch):
    from tunelab.testing import tiny_tokenizer

    folder = tmp_path / "tok"
    tiny_tokenizer("chatml").save_pretrained(folder)
    code, out, _ = run(
        capsys, "data", "check", str(EXAMPLES / "extract" / "train.jsonl"), "--model", str(folder),
        "--max-seq-len", "200", "--truncation", "drop", "--json", "-q",
    )  # fmt: skip
    stats = json.loads(out)
    assert code == 0 and stats["lengths_exact"] is True
    over = stats["over_limit"]
    assert 0 < over < 400 and stats["kept"] == 400 - over
    assert sum(stats["dropped"].values()) == over


def test_diversity_warning_is_shown_and_strict_fails(capsys):
    code, out, _ = run(capsys, "data", "check", str(EXAMPLES / "repetitive.jsonl"), "--strict")
    assert code == 1
    assert "warning:" in out and "same instruction" in out


def test_diversity_threshold_from_config_and_flag(capsys, tmp_path):
    # repetitive.jsonl: 90% of records share one instruction; the default threshold 0.5 warns.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  diversity_threshold: 0.95\n")
    src = str(EXAMPLES / "repetitive.jsonl")
    code, out, _ = run(capsys, "data", "check", src, "--config", str(cfg), "--json")
    assert code == 0 and json.loads(out)["diversity"]["warning"] is None  # the config's 0.95
    code, out, _ = run(
        capsys, "data", "check", src, "-c", str(cfg), "--diversity-threshold", "0.8", "--json"
    )
    assert code == 0 and "same instruction" in json.loads(out)["diversity"]["warning"]


def test_train_eval_overlap(capsys, tmp_path):
    train = [json.dumps({"instruction": f"q{i} word{i}", "output": f"a{i}"}) for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(train))
    (tmp_path / "eval.jsonl").write_text(
        "\n".join(train[:3] + ['{"instruction": "new", "output": "x"}'])
    )
    code, out, _ = run(
        capsys,
        "data",
        "check",
        str(tmp_path / "train.jsonl"),
        "--eval",
        str(tmp_path / "eval.jsonl"),
        "--json",
    )
    assert code == 0 and json.loads(out)["overlap"]["exact"] == 3


def test_config_errors_reach_the_cli(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  truncation: cut\n")
    code, _, err = run(capsys, "data", "check", str(EXAMPLES / "kto.jsonl"), "--config", str(cfg))
    assert code == 2 and f"{cfg}:2: data.truncation: 'cut' is not allowed" in err


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(
        capsys, "data", "check", str(EXAMPLES / "kto.jsonl"), "--model", str(tmp_path / "nope")
    )
    assert code == 2 and "not a model folder or .gguf file" in err


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run(capsys, "data", "check", str(EXAMPLES / "kto.jsonl"), "--model", str(bad))
    assert code == 2 and "could not read a tokenizer from this GGUF file" in err


@pytest.mark.parametrize(
    "name",
    ["alpaca_small.json", "small.csv", "preferences.jsonl", "kto.jsonl", "general/general.jsonl"],
)
def test_every_shipped_format_checks(capsys, name):
    code, out, _ = run(capsys, "data", "check", str(EXAMPLES / name), "--json")
    assert code == 0 and json.loads(out)["records"] >= 20


# -- split -------------------------------------------------------------------------------------
def test_split_is_deterministic_and_leak_free(capsys, tmp_path):
    src = EXAMPLES / "extract" / "train.jsonl"
    outs = []
    for name in ("a", "b"):
        code, _, _ = run(
            capsys, "data", "split", str(src), "--seed", "7", "--out", str(tmp_path / name)
        )
        assert code == 0
        outs.append(
            {s: (tmp_path / name / f"{s}.jsonl").read_text() for s in ("train", "val", "test")}
        )
    assert outs[0] == outs[1]
    counts = {s: len(t.splitlines()) for s, t in outs[0].items()}
    assert counts == {"train": 280, "val": 60, "test": 60}
    train = {json.dumps(json.loads(line)["messages"][1]) for line in outs[0]["train"].splitlines()}
    test = {json.dumps(json.loads(line)["messages"][1]) for line in outs[0]["test"].splitlines()}
    assert not train & test
    code, _, _ = run(capsys, "data", "split", str(src), "--seed", "8", "--out", str(tmp_path / "c"))
    assert (tmp_path / "c" / "test.jsonl").read_text() != outs[0]["test"]


def test_split_ratios_and_seed_from_config_flags_and_overrides(capsys, tmp_path):
    src = str(EXAMPLES / "extract" / "train.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  split_ratios: [0.5, 0.5]\n  seed: 7\n")

    def split(name, *args):
        code, _, err = run(capsys, "data", "split", src, "--out", str(tmp_path / name), *args)
        assert code == 0, err
        return {p.name: p.read_text() for p in (tmp_path / name).iterdir()}

    from_config = split("config", "-c", str(cfg))
    assert sorted(from_config) == ["train.jsonl", "val.jsonl"]  # two shares: no test split
    assert from_config == split("flags", "--ratios", "0.5,0.5", "--seed", "7")
    assert from_config == split("dotted", "data.split_ratios=[0.5,0.5]", "data.seed=7")
    # flags win over the config; with neither, the defaults (0.7/0.15/0.15, seed 42)
    overridden = split("over", "-c", str(cfg), "--ratios", "0.7,0.15,0.15", "--seed", "42")
    assert overridden == split("defaults")
    assert split("seed-only", "-c", str(cfg), "--seed", "42") != from_config


def test_split_bad_ratios_in_the_config(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  split_ratios: [0.6, 0.6]\n")
    code, _, err = run(
        capsys,
        "data",
        "split",
        str(EXAMPLES / "kto.jsonl"),
        "-c",
        str(cfg),
        "-o",
        str(tmp_path / "o"),
    )
    assert code == 2 and f"{cfg}:2: data.split_ratios: split ratios 0.6/0.6 must sum to 1" in err
    assert not (tmp_path / "o").exists()


def test_split_too_few_rows_writes_nothing(capsys, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n')
    code, _, err = run(capsys, "data", "split", str(src), "--out", str(tmp_path / "out"))
    assert code == 2 and "2 records" in err and "need at least" in err
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == set()


def test_split_bad_ratios(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "data",
        "split",
        str(EXAMPLES / "kto.jsonl"),
        "--ratios",
        "0.7,0.7",
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "must sum to 1" in err
    code, _, err = run(
        capsys,
        "data",
        "split",
        str(EXAMPLES / "kto.jsonl"),
        "--ratios",
        "a,b",
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "comma-separated numbers" in err
    assert tree(tmp_path) == set()


def test_usage_errors_exit_non_zero(capsys):
    code, _, _ = run(capsys, "data", "check")
    assert code == 2


def test_version_and_help(capsys):
    assert run(capsys, "--version")[1].strip().startswith("tunelab ")
    for group in ("data", "config", "models"):
        code, out, _ = run(capsys, group, "--help")
        assert code == 0 and "Usage" in out


def test_config_show(capsys):
    code, out, _ = run(capsys, "config", "show", "data.prompt_loss_weight=0.3")
    assert code == 0 and "prompt_loss_weight: 0.3" in out


def test_split_dedup_drops_exact_duplicates(capsys, tmp_path):
    src = tmp_path / "d.jsonl"
    rows = [
        json.dumps({"instruction": f"question {i} {'x' * i}", "output": "a"}) for i in range(20)
    ]
    src.write_text("\n".join(rows + rows[:5]))
    code, out, _ = run(capsys, "data", "split", str(src), "--dedup", "--out", str(tmp_path / "o"))
    assert code == 0 and "dropped 5 exact duplicate(s)" in out
    total = sum(
        len((tmp_path / "o" / f"{s}.jsonl").read_text().splitlines())
        for s in ("train", "val", "test")
    )
    assert total == 20
