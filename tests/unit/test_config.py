"""Typed config: YAML + dotted overrides; unknown keys and impossible values named."""

import pytest

from tunelab.config.load import dump_config, load_config
from tunelab.errors import ConfigError


def error_of(*args) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    return str(e.value)


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: train.jsonl\n  max_seq_len: 512\n")
    cfg = load_config(
        p, ["data.prompt_loss_weight=0.25", "data.truncation=truncate", "model.name=./m"]
    )
    assert cfg.data.path == "train.jsonl" and cfg.data.max_seq_len == 512
    assert cfg.data.prompt_loss_weight == 0.25 and cfg.data.truncation == "truncate"
    assert cfg.model.name == "./m"
    assert load_config().data.prompt_loss_weight == 0.1  # the documented default


def test_defaults_of_settings_that_were_only_flags():
    cfg = load_config()
    assert cfg.data.split_ratios == [0.7, 0.15, 0.15] and cfg.data.seed == 42
    assert cfg.data.diversity_threshold == 0.5
    assert cfg.eval.shots == [0, 3] and cfg.eval.shot_seed == 0 and cfg.eval.instruction is None
    assert cfg.eval.sheet is False


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.val_ratio=0.2", "data.columns={instruction: q}"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: x.jsonl\n  prompt_los_weight: 0.2\n")
    msg = error_of(p)
    assert f"{p}:3: data.prompt_los_weight: unknown key" in msg
    assert "prompt_loss_weight" in msg and "did you mean 'prompt_loss_weight'?" in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  lr: 1\n")
    assert (
        f"{p}:1: trian: unknown key (allowed: name, model, method, data, train, eval, plan, stages)"
        in error_of(p)
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.prompt_loss_weight=1.5", "data.prompt_loss_weight: input should be less than or equal to 1 (got 1.5)"),
        ("data.max_seq_len=0", "data.max_seq_len: input should be greater than 0"),
        ("data.truncation=cut", "data.truncation: 'cut' is not allowed (expected one of: 'drop', 'truncate_prompt', 'truncate', 'error')"),
        ("data.format=parquet", "expected one of: 'auto', 'alpaca', 'chat', 'preference', 'kto', 'text'"),
        ("data.columns={instrction: q}", "unknown record field 'instrction'"),
        ("data.max_seq_len=abc", "data.max_seq_len: input should be a valid integer"),
        ("data.split_ratios=[0.6, 0.6]", "data.split_ratios: split ratios 0.6/0.6 must sum to 1 (they sum to 1.2)"),
        ("data.split_ratios=[1.0]", "data.split_ratios: expected two or three shares (train, val[, test]), got 1: 1"),
        ("data.split_ratios=[1.2, -0.2]", "data.split_ratios: split ratios 1.2/-0.2 must all be positive"),
        ("data.diversity_threshold=0", "data.diversity_threshold: input should be greater than 0"),
        ("eval.shots=[0, -3]", "eval.shots: shot counts must be non-negative (got [0, -3])"),
        ("eval.shots=[]", "eval.shots: expected at least one shot count"),
    ],
)  # fmt: skip
def test_impossible_values(override, expected):
    msg = error_of(None, [override])
    assert msg.startswith(f"override {override!r}: ")
    assert expected in msg


def test_bad_override_syntax():
    assert "expected KEY=VALUE" in error_of(None, ["data.max_seq_len"])
    assert "is a value, not a section" in error_of(None, ["name=x", "name.y=1"])


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: [unclosed\n")
    assert f"{p}:" in error_of(p) and "invalid YAML" in error_of(p)
    p.write_text("- a\n- b\n")
    assert "expected a mapping" in error_of(p)
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
