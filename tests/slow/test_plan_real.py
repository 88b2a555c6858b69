"""`tunelab train --dry-run` on the example config with the real default model: the plan is
printed and no weight file is opened (the model is pulled first, as a first run would)."""

from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.models import catalog

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extract" / "train.yaml"


@pytest.fixture(scope="module")
def pulled():
    catalog.pull("smollm2-135m-instruct")


def test_dry_run_of_the_example_reads_no_weights(
    pulled, no_weights_read, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(EXAMPLE.parents[2])
    code = main(["train", "--dry-run", str(EXAMPLE.relative_to(EXAMPLE.parents[2])),
                 f"train.output_dir={tmp_path}", "name=dry"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    for expected in [
        "smollm2-135m-instruct (llama, 30 layers, hidden 576",
        "cpu (fp32)",
        "400 train / 50 validation",
        "50 in all",
        "every 10 steps",
    ]:
        assert expected in out, out
