"""tunelab lr-find on the tiny model: a proposal, files written, nothing else touched."""

import hashlib
import json

from tunelab.cli import main


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_lr_find_proposes_a_rate_and_touches_nothing(tmp_path, model_dir, data_file, capsys):
    before = _digest(model_dir)
    out = tmp_path / "lrf"
    code = main(["lr-find", f"model.name={model_dir}", f"data.path={data_file}", "method.name=full",
                 "train.micro_batch_size=2", f"train.output_dir={tmp_path / 'runs'}", "--start", "1e-6",
                 "--end", "1000", "--steps", "40", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((out / "lr_find.json").read_text())
    lrs = result["lrs"]
    assert (
        lrs == sorted(lrs) and lrs[0] == 1e-6 and len(lrs) < 40
    )  # stopped before lr 1000: diverged
    assert "diverged" in result["stopped"] or "not finite" in result["stopped"]
    assert result["proposed"] and lrs[0] < result["proposed"] < lrs[-1]
    assert "proposed train.lr=" in printed and (out / "lr_find.png").stat().st_size > 0
    assert _digest(model_dir) == before  # the model on disk is untouched
    assert not (tmp_path / "runs").exists()  # and no run folder was made


def test_lr_find_refuses_a_start_above_the_end(tmp_path, model_dir, data_file, capsys):
    code = main(["lr-find", f"model.name={model_dir}", f"data.path={data_file}", "--start", "1",
                 "--end", "1e-3", "--out", str(tmp_path / "o")])  # fmt: skip
    assert (
        code == 2 and "--start 1 must be positive and below --end 0.001" in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()
