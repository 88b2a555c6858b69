"""Shipping a run: `tunelab merge` (a model folder transformers loads without tunelab),
`tunelab export --format peft|safetensors|gguf` — round trips against the adapter on its base,
GGUF read back by transformers' own reader — and the bad inputs (exit 2, nothing written)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.runs import config, quiet
from tunelab.cli import main
from tunelab.testing import tiny_model_dir
from tunelab.workflow.finetune import finetune

TEXT = "Extract the number from: order 3 of 21 boxes"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, data_file):
    root = tmp_path_factory.mktemp("ship")
    return finetune(config(root, model_dir, data_file, "train.lr=5e-2"), log=quiet)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, data_file):
    root = tmp_path_factory.mktemp("qwen")
    model = tiny_model_dir(root / "qwen-model", arch="qwen2")
    return finetune(config(root, model, data_file, "train.lr=5e-2"), log=quiet)


def _logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _adapter_on_base(run, model_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, run / "final").eval()


def test_merged_folder_equals_the_adapter_on_its_base(lora_run, model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--out", str(out)]) == 0
    assert "written" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "tunelab_merged_from.json"} <= {
        p.name for p in out.iterdir()}  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no tunelab, no peft
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = _adapter_on_base(lora_run, model_dir)
    assert torch.allclose(_logits(merged, tokenizer), _logits(reference, tokenizer), atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.allclose(
        _logits(merged, tokenizer), _logits(base, tokenizer), atol=1e-3
    )  # it trained
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(model_dir).chat_template
    assert json.loads((out / "tunelab_merged_from.json").read_text())["adapter_merged"] is True


def test_export_peft_is_the_adapter_alone(lora_run, model_dir, tmp_path):
    import shutil

    from peft import PeftModel

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    saved = json.loads((run / "final" / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = "/a/cache/path/of/the/base"  # what PEFT may record
    (run / "final" / "adapter_config.json").write_text(json.dumps(saved))
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(model_dir)  # the base as the run names it
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(
        _logits(loaded, tokenizer), _logits(_adapter_on_base(lora_run, model_dir), tokenizer)
    )


#: max |Δlogit| over the sequence and vocabulary, as a share of the logits' standard deviation,
#: and the share of positions whose most likely next token must be the same
TOLERANCE = {"f32": (1e-5, 1.0), "f16": (0.05, 1.0), "q8_0": (0.5, 0.8)}


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_gguf_reads_back_through_transformers(lora_run, qwen_run, tmp_path, dtype, which):
    """The tiny random models' logits are nearly flat (std ~0.16), which makes 8-bit blocks'
    rounding loom large: the real model's check (tests/slow) compares greedy answers."""
    run = lora_run if which == "llama" else qwen_run
    out = tmp_path / f"model-{dtype}.gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    expected_model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    expected, got = _logits(expected_model, tokenizer), _logits(back, tokenizer)
    import gguf

    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not expected_model.config.tie_word_embeddings)
    spread, same = TOLERANCE[dtype]
    print(f"{which} {dtype}: max |dlogit| / std = {float((got - expected).abs().max() / expected.std()):.4f}, "
          f"same argmax {float((got.argmax(-1) == expected.argmax(-1)).float().mean()):.2f}")  # fmt: skip
    assert (got - expected).abs().max() <= spread * expected.std()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= same
    assert back_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    messages = [{"role": "user", "content": TEXT}]
    assert back_tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False)  # fmt: skip


def test_full_fine_tune_merges_to_its_final_weights(tmp_path, model_dir, data_file):
    run = finetune(
        config(tmp_path, model_dir, data_file, "method.name=full", "train.lr=1e-2"), log=quiet
    )
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert (
        main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "a")]) == 2
    )  # no adapter


def test_bad_inputs_exit_2_and_write_nothing(lora_run, tmp_path, capsys):
    out = tmp_path / "x"
    cases = [
        (["merge", str(tmp_path), "--out", str(out)], "not a tunelab run folder"),
        (
            ["export", str(lora_run), "--format", "onnx", "--out", str(out)],
            "--format onnx: expected one of",
        ),
        (
            ["export", str(lora_run), "--format", "gguf", "--dtype", "q4_k", "--out", str(out)],
            "--dtype q4_k",
        ),
        (["merge", str(lora_run), "--out", str(out), "--dtype", "int8"], "--dtype int8"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(lora_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((lora_run / "config.yaml").read_text())
    assert main(["export", str(unfinished), "--out", str(tmp_path / "u.gguf")]) == 2
    assert "without finished weights" in capsys.readouterr().err


def test_an_interrupted_gguf_export_leaves_nothing(lora_run, tmp_path, monkeypatch):
    import tunelab.models.gguf as g

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(g, "_add", fail)
    with pytest.raises(RuntimeError):
        main(["export", str(lora_run), "--out", str(tmp_path / "m.gguf")])
    assert list(tmp_path.iterdir()) == []


def test_gguf_refuses_an_unsupported_family(tmp_path, data_file, capsys):
    model = tiny_model_dir(tmp_path / "gemma-model", arch="gemma")
    run = finetune(config(tmp_path, model, data_file, "train.max_steps=1"), log=quiet)
    assert main(["export", str(run), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "model_type 'gemma' is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()


def _as_qlora(lora_run, tmp_path, bits, precision="fp32"):
    """The LoRA run relabelled as a QLoRA run trained at ``precision`` (its adapter is a valid
    adapter for the 4-bit base: what a merge does with it is the point, not how well it was
    trained)."""
    import shutil

    import yaml

    run = tmp_path / f"qlora{bits}"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["method"].update(name="qlora", bits=bits)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "precision": precision}))
    return run


@pytest.mark.parametrize(("bits", "precision"), [(4, "bf16"), (8, "fp32")])
def test_a_qlora_adapter_merges_into_its_dequantised_base(
    lora_run, model_dir, tmp_path, capsys, bits, precision
):
    pytest.importorskip("bitsandbytes", minversion="0.48")
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    run = _as_qlora(lora_run, tmp_path, bits, precision)
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"merged into the {bits}-bit base de-quantised" in said and "merging is exact" in said
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None  # a plain fp32 model
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the reference, built here with transformers and PEFT alone: the base quantised as QLoRA
    # loaded it (from the weights in the run's precision), de-quantised, the adapter on top
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    if bits == 4:
        settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    else:
        settings = BitsAndBytesConfig(load_in_8bit=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=settings, device_map={"": "cpu"}, dtype=dtype
    )
    on_dequantised = PeftModel.from_pretrained(quantized.dequantize().float(), run / "final").eval()
    expected = _logits(on_dequantised, tokenizer)
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-5)
    # and not the adapter on the original weights: they differ by the quantisation error
    full_precision = _logits(_adapter_on_base(run, model_dir), tokenizer)
    assert (full_precision - expected).abs().max() > 1e-3
    # close to the training-time model, the adapter on the quantised base itself
    quantized = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=settings, device_map={"": "cpu"}, dtype=torch.float32
    )
    trained = _logits(PeftModel.from_pretrained(quantized, run / "final").eval(), tokenizer)
    assert (trained - expected).abs().max() < 0.05 * expected.std()


def test_a_qlora_merge_that_does_not_match_is_refused(lora_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes", minversion="0.48")
    import tunelab.models.methods.lora as lora

    monkeypatch.setattr(lora, "merge_and_unload", lambda model: model.unload())  # adapter lost
    out = tmp_path / "merged"
    assert main(["merge", str(_as_qlora(lora_run, tmp_path, 4)), "--out", str(out)]) == 2
    assert "not writing it" in capsys.readouterr().err
    assert not out.exists()
