"""The metrics log, the loss plot and summary.md."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import DataError
from tunelab.train.report import MetricsLog, plot_losses, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_append_then_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.append({"step": 1, "loss": 2.5})
        log.append({"step": 2, "loss": 2.0, "lr": 1e-4})
        # flushed per record: visible to another reader before close
        assert MetricsLog.read(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "lr": 1e-4}]  # fmt: skip
    assert MetricsLog.read(tmp_path / "missing.jsonl") == []


def test_a_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # killed mid-write
    assert MetricsLog.read(path) == [{"step": 1, "loss": 2.5}]

    with MetricsLog(path) as log:
        log.append({"step": 2, "loss": 2.0})
    assert MetricsLog.read(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert path.read_text().endswith('"loss": 2.0}\n')


def test_a_bad_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: invalid JSON"):
        MetricsLog.read(path)


def test_truncate_after_keeps_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"event": "start"})
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    log.append({"step": 4, "eval_loss": 0.9})

    assert log.truncate_after(3) == 3
    assert [r.get("step") for r in MetricsLog.read(path)] == [None, 1, 2, 3]
    log.append({"step": 4, "loss": 0.2})  # the resumed run goes on in the same file
    log.close()
    assert [r.get("step") for r in MetricsLog.read(path)] == [None, 1, 2, 3, 4]
    assert MetricsLog(tmp_path / "none.jsonl").truncate_after(3) == 0


@pytest.mark.parametrize("n", [0, 10, 200])
def test_plot_writes_a_png(tmp_path, n):
    records = [
        {"step": s, "loss": 3 / s**0.5, "lr": 1e-4 * min(1, s / 10)} for s in range(1, n + 1)
    ]
    records.append({"step": n // 2, "loss": math.nan})  # a skipped step
    records += [{"step": s, "eval_loss": 2 / s**0.3} for s in range(10, n + 1, 10)]
    out = plot_losses(records, tmp_path / "plots" / "loss.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]


def test_summary_has_the_numbers(tmp_path):
    path = write_summary(
        tmp_path,
        {
            "name": "extract-lora",
            "model": "smollm2-135m-instruct",
            "method": "lora",
            "hyperparameters": {"r": 16, "alpha": 32, "lr": 2e-4},
            "train_records": 900,
            "val_records": 100,
            "train_tokens": 123456,
            "elapsed_s": 754.2,
            "tokens_per_s": 1637.4,
            "peak_memory_bytes": 3.5 * 2**30,
            "final_train_loss": 0.81234,
            "best_eval_loss": 0.9,
            "best_step": 300,
            "nan_skips": 2,
            "output": "runs/extract-lora/adapter",
            "seed": 42,
        },
    )
    text = path.read_text()
    assert path == tmp_path / "summary.md"
    for expected in ["# Run extract-lora", "smollm2-135m-instruct", "lora (r=16, alpha=32, lr=0.0002)",
                     "900 train records", "100 validation records", "123,456 tokens",
                     "12m 34s", "1,637 tokens/s", "3.50 GiB", "0.8123", "0.9000",
                     f"perplexity {math.exp(0.9):.2f}", "at step 300", "skipped:** 2",
                     "runs/extract-lora/adapter", "seed:** 42"]:  # fmt: skip
        assert expected in text, expected


def test_summary_takes_config_dicts_and_other_keys(tmp_path):
    info = {
        "method": {"name": "qlora", "r": 8, "alpha": None, "bits": 4, "trainable_layers": 2},
        "train": {"lr": 0.001, "epochs": 3.0, "max_steps": None, "output_dir": "runs"},
        "train_examples": 40, "tokens": 5000, "seconds": 3725, "wall_seconds": 3790.0,
        "peak_gpu_gib": 1.25, "peak_rss_gib": 0.5, "best_eval_loss": None, "stopped_early": True,
        "dropped": {"too_long": 3},
    }  # fmt: skip
    text = write_summary(tmp_path, info).read_text()
    for expected in ["qlora (r=8, bits=4)", "lr=0.001, epochs=3.0", "40 train records",
                     "5,000 tokens", "1h 02m 05s", "1h 03m 10s in all", "GPU 1.25 GiB",
                     "process 0.50 GiB", "stopped early", "dropped:** too_long=3"]:  # fmt: skip
        assert expected in text, expected
    assert "trainable_layers" not in text and "max_steps" not in text and "Best" not in text


def test_summary_with_almost_nothing(tmp_path):
    text = write_summary(tmp_path / "run-7", {}).read_text()
    assert text.startswith("# Run run-7")


def test_a_preference_run_plots_margin_and_accuracy_panels(tmp_path):
    from PIL import Image

    from tunelab.train.report import plot_losses

    sft = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 6)]
    dpo = [r | {"margin": 0.1 * r["step"], "reward_accuracy": 0.5} for r in sft]
    dpo.append({"step": 5, "eval_loss": 0.5, "eval_margin": 0.4, "eval_reward_accuracy": 0.8})
    heights = [
        Image.open(plot_losses(rs, tmp_path / f"{i}.png")).height for i, rs in enumerate((sft, dpo))
    ]
    assert heights[1] > heights[0] * 1.4  # two more panels
