import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
