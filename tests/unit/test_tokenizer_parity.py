"""The quick tokenizer path (a generic TokenizersBackend loaded directly) gives exactly what
AutoTokenizer gives, and its model-type list agrees with the installed transformers."""

import json

import pytest
from transformers import AutoTokenizer
from transformers.models.auto.tokenization_auto import (
    MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
    TOKENIZER_MAPPING_NAMES,
)

from tunelab.models.tokenizer import GENERIC_TOKENIZER_MODEL_TYPES, _generic_class, load_tokenizer
from tunelab.testing import tiny_model_dir

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo wörld 123 <|im_end|> 🚀"},
    {"role": "assistant", "content": '{"a": 1}'},
]


@pytest.mark.parametrize("model_type", sorted(GENERIC_TOKENIZER_MODEL_TYPES))
def test_listed_model_types_have_no_tokenizer_of_their_own(model_type):
    assert model_type not in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    assert TOKENIZER_MAPPING_NAMES.get(model_type) in (None, "TokenizersBackend")


@pytest.mark.parametrize("kind", ["chatml", "llama3", "base"])
def test_quick_path_equals_auto_tokenizer(tmp_path, kind):
    folder = tiny_model_dir(tmp_path / kind, kind=kind)
    assert (
        json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "TokenizersBackend"
    )
    assert _generic_class(folder) is not None  # the quick path is taken for these folders
    quick, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(quick) is type(auto)
    assert quick.get_vocab() == auto.get_vocab()
    assert quick.all_special_tokens == auto.all_special_tokens and quick.pad_token == (
        auto.pad_token or auto.eos_token
    )
    texts = ["x y z 🚀 <|im_start|> </s>", "SELECT name FROM users;"]
    assert quick(texts)["input_ids"] == auto(texts)["input_ids"]
    if auto.chat_template:
        assert quick.apply_chat_template(MESSAGES, tokenize=False) == auto.apply_chat_template(
            MESSAGES, tokenize=False
        )


def test_other_model_types_go_through_auto_tokenizer(tmp_path):
    folder = tiny_model_dir(tmp_path / "qwen", arch="qwen2")
    assert _generic_class(folder) is None
