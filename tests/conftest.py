import os
import sys
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile into a cache of their own: the markers of layer graphs compiled by a developer's
# runs (train/speed.py) cannot change what train.compile auto decides in a test.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tunelab-tests-inductor-")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["chatml", "llama3", "base"])
def tokenizer(request):
    """A tiny real BPE tokenizer of each template family (see tunelab.testing)."""
    from tunelab.data.render import ensure_chat_template
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer(request.param)
    ensure_chat_template(tok)
    return tok


@pytest.fixture
def write(tmp_path):
    """write("name.jsonl", text_or_bytes) -> path"""

    def _write(name, content):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return _write


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail on any open of a weight file (Python opens via an audit hook; safetensors' own
    reader and transformers' model loading patched)."""
    opened, armed = [], [True]

    def hook(event, args):
        if armed[0] and event == "open" and str(args[0]).endswith(WEIGHT_SUFFIXES):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one only records while armed
    import safetensors
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        opened.append(str(args[0]) if args else "?")
        raise AssertionError("a weight file was read")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    yield opened
    armed[0] = False
    assert not opened, f"weight files opened: {opened}"
