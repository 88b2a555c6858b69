"""Every command's progress bar redraws once a second, not rich's ten: a redrawing thread that
wakes ten times a second beside training's threads cost the example's steps ~11 % on 2 cores
(docs/speed.md, "Progress bars")."""

import pytest
from rich.progress import Progress

from tests.integration.test_eval import write_jsonl
from tunelab.cli import main
from tunelab.cli.progress import REDRAWS_PER_SECOND


@pytest.fixture
def bars(monkeypatch):
    """The redraw rate of every bar a command builds."""
    rates, build = [], Progress.__init__

    def record(self, *columns, **kwargs):
        build(self, *columns, **kwargs)
        rates.append(self.live.refresh_per_second if self.live.auto_refresh else 0)

    monkeypatch.setattr(Progress, "__init__", record)
    return rates


def test_the_commands_bars_redraw_once_a_second(tmp_path, model_dir, data_file, bars, capsys):
    runs = ["model.name=" + str(model_dir), f"data.path={data_file}", "train.micro_batch_size=2"]
    commands = {
        "train": ["train", *runs, f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=2"],
        "lr-find": ["lr-find", *runs, f"train.output_dir={tmp_path / 'lrf'}", "--steps", "10",
                    "--out", str(tmp_path / "lrf")],
        "eval": ["eval", str(model_dir), "--data", str(write_jsonl(tmp_path / "test.jsonl", 2)),
                 "--out", str(tmp_path / "ev"), "eval.max_new_tokens=2"],
        "data check": ["data", "check", str(data_file), "--model", str(model_dir)],
    }  # fmt: skip
    for name, args in commands.items():
        before = len(bars)
        code = main(args)
        assert code == 0, (name, capsys.readouterr().err)
        assert len(bars) > before, f"{name} drew no bar"
    assert REDRAWS_PER_SECOND <= 1 and set(bars) == {REDRAWS_PER_SECOND}
    assert "step 2/2" in capsys.readouterr().err  # the train bar, as drawn
