"""Small builders shared by tests."""

from tunelab.data.read import Source
from tunelab.data.records import Example, Message


def chat(*turns, system=None, fmt="chat", weights=None):
    """chat("q1", "a1", "q2", "a2", system="be brief") -> Example"""
    msgs = [Message("system", system)] if system else []
    for i, content in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        weight = (weights or {}).get(i)
        msgs.append(Message(role, content, weight))
    return Example(Source("test.jsonl", 1), fmt, msgs)


def as_dicts(example):
    return [{"role": m.role, "content": m.content} for m in example.messages]


def reference_ids(tokenizer, example):
    out = tokenizer.apply_chat_template(as_dicts(example), tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
