"""Shipping a real fine-tune of the default model: merged folder and GGUF (f16, q8_0) answer the
example task's test rows as the run folder does (greedy; the same answer on at least 19 of 20)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.evaluate.generate import GenerationOptions, generate
from tunelab.models.run_folder import load_run
from tunelab.workflow.finetune import finetune

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "extract"
OPTIONS = GenerationOptions(max_new_tokens=64, batch_size=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship-real")
    # fp32 training: a 12-step adapter leaves many near-tie answers, and the test is about the
    # export's fidelity. (Trained in bf16 on a 2-core Xeon with AMX, q8_0 agreed on 17 of 20,
    # f16 still on 19+; 2026-11-30.)
    cfg = load_config(EXAMPLES / "train.yaml", [
        f"train.output_dir={root}", "name=real", "train.max_steps=12", "train.eval_steps=12",
        "eval.at_end=false", "train.eval_at_start=false", "model.precision=fp32",
    ])  # fmt: skip
    return finetune(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def prompts():
    rows = [json.loads(x) for x in (EXAMPLES / "test.jsonl").read_text().splitlines()[:20]]
    return [r["messages"][:-1] for r in rows]


@pytest.fixture(scope="module")
def answers(run, prompts):
    loaded = load_run(run)
    return generate(loaded.model, loaded.tokenizer, prompts, OPTIONS)


def _same(a, b):
    return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True))


def test_merged_folder_answers_as_the_run(run, prompts, answers, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert _same(generate(model, tokenizer, prompts, OPTIONS), answers) == 20


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_answers_as_the_run(run, prompts, answers, tmp_path, dtype):
    out = tmp_path / f"real-{dtype}.gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    same = _same(generate(model, tokenizer, prompts, OPTIONS), answers)
    print(f"GGUF {dtype}: {same}/20 greedy answers equal to the run folder's")
    assert same >= 19


def test_gguf_keeps_llama_cpp_pre_tokenizer_name_of_the_catalog_model(run, tmp_path):
    import gguf

    out = tmp_path / "pre.gguf"
    assert main(["export", str(run), "--dtype", "q8_0", "--out", str(out)]) == 0
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # as in the GGUF the model came from
    assert fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("dtype, spread", [("f32", 1e-4), ("q8_0", 0.15)])
def test_gemma3_gguf_reads_back_through_transformers(tmp_path, dtype, spread):
    """The catalog's Gemma-3-270M written as GGUF (gemma3 architecture: norms stored as 1 + w,
    four norms a layer, q/k norms, a SentencePiece-style tokenizer) and read back."""
    from tunelab.models import catalog
    from tunelab.models.gguf import write_gguf
    from tunelab.models.load import load_model

    catalog.pull("gemma-3-270m")
    model, tokenizer = load_model("gemma-3-270m")
    out = tmp_path / f"gemma-{dtype}.gguf"
    write_gguf(model, tokenizer, out, dtype=dtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    text = "The capital of France is Paris.  Two  spaces, digits 12345 and émigré."
    if dtype == "f32":  # the tokenizer is written the same whatever the weights' type (~15 s)
        back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    print(
        f"gemma3 {dtype}: max |dlogit| / std = {float((got - expected).abs().max() / expected.std()):.4f}"
    )
    assert (got - expected).abs().max() <= spread * expected.std()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
