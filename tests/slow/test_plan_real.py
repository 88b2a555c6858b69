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
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a fresh machine's
    code = main(["train", "--dry-run", str(EXAMPLE.relative_to(EXAMPLE.parents[2])),
                 f"train.output_dir={tmp_path}", "name=dry"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    for expected in [
        "smollm2-135m-instruct (llama, 30 layers, hidden 576",
        "cpu (",  # fp32, or bf16 where auto finds it pays on this CPU (said why)
        "400 train / 50 validation",
        "50 in all",
        "every 10 steps",
        # ~156 s of eager steps, ~45 s saved a run: repays ~48 s over two (no rates measured yet)
        "compile: auto: on (~156 s of eager steps at ~180 GFLOP/s, ~45 s saved; ~48 s cold, repaid over two runs)",
    ]:
        assert expected in out, out
    assert "cpu (fp32)" in out or "cpu (bf16: auto: this CPU has" in out, out


def test_the_quick_tokenizer_path_equals_auto_tokenizer_on_smollm2(pulled):
    from transformers import AutoTokenizer

    from tunelab.models.tokenizer import _generic_class, load_tokenizer

    folder = catalog.hf_dir("smollm2-135m-instruct")
    assert _generic_class(folder) is not None
    quick, auto = load_tokenizer("smollm2-135m-instruct"), AutoTokenizer.from_pretrained(folder)
    assert type(quick) is type(auto) and quick.get_vocab() == auto.get_vocab()
    messages = [
        {"role": "user", "content": "Héllo 🚀 <|im_end|>"},
        {"role": "assistant", "content": "ok"},
    ]
    assert quick.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(
        messages, tokenize=False
    )
    texts = [(EXAMPLE.parent / "train.jsonl").read_text()[:5000], "x <|im_start|> y"]
    assert quick(texts)["input_ids"] == auto(texts)["input_ids"]


def test_tunelab_plan_on_the_example_reads_no_weights_and_answers_in_under_3_s(
    pulled, no_weights_read, tmp_path, capsys, monkeypatch
):
    import subprocess
    import sys
    import time

    monkeypatch.chdir(EXAMPLE.parents[2])
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no rates measured
    config = str(EXAMPLE.relative_to(EXAMPLE.parents[2]))
    assert main(["plan", config, f"train.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for expected in ["134.5M parameters", "400 training examples", "4 sequences x 153 tokens",
                     "peak", "H100-80GB", "method.name=lora", "train.lr=0.001",
                     # what train --dry-run says (above): the same rule on the same FLOPs
                     "compile: auto: on (~156 s of eager steps at ~180 GFLOP/s, ~45 s saved; "
                     "~48 s cold, repaid over two runs)"]:  # fmt: skip
        assert expected in out, (expected, out)
    best = float("inf")
    # the best of four: a cold disk cache is not the command's time, and this 2-core machine's
    # speed moves +-30 % from run to run (2.1-3.3 s for the same command on 2026-12-01)
    for _ in range(4):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tunelab", "plan", config, f"train.output_dir={tmp_path}"],
                              capture_output=True, text=True)  # fmt: skip
        best = min(best, time.perf_counter() - started)
        assert done.returncode == 0, done.stderr
    assert best < 3.0, best
