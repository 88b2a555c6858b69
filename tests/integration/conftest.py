import json

import pytest

from tunelab.testing import tiny_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama-style model folder (2 layers, 64 wide, chatml tokenizer)."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """16 short extraction conversations."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for i in range(16):
        rows.append({"messages": [
            {"role": "user", "content": f"Extract the number from: order {i} of {i * 7} boxes"},
            {"role": "assistant", "content": json.dumps({"order": i, "boxes": i * 7})},
        ]})  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="session")
def general_file(tmp_path_factory):
    """8 general conversations the task data never has: a replay pool, a first stage."""
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                          {"role": "assistant", "content": f"Topic {i} is a fine topic."}]}
            for i in range(8)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
