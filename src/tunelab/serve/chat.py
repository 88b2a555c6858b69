"""``tunelab chat``: talk to a run or a model in the terminal — the model's chat template, the
reply streamed as it is generated, ``/reset`` to start over, ``/exit`` (or Ctrl-D) to leave.
It uses the serving engine, so a chat sees exactly what ``tunelab serve`` would answer."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tunelab.serve.engine import Engine, Job

HELP = "/reset starts a new conversation, /exit leaves (Ctrl-D too)"


def chat_loop(
    engine: Engine,
    *,
    system: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 256,
    read: Callable[[str], str] = input,
    write=sys.stdout,
) -> int:
    """Run the conversation until /exit or end of input; returns the number of replies."""
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    write.write(f"chatting with {engine.base} ({HELP})\n")
    write.flush()
    replies = 0
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write.write("\n")
            return replies
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return replies
        if line == "/reset":
            history = list(start)
            write.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write.write(f"unknown command {line.split()[0]} ({HELP})\n")
            continue
        history.append({"role": "user", "content": line})
        job = engine.submit(Job(model=engine.base, prompt_ids=engine.prompt_ids(messages=history),
                                max_tokens=max_tokens, temperature=temperature, top_p=top_p))  # fmt: skip
        write.write("model> ")
        pieces = []
        for piece in job.pieces():
            pieces.append(piece)
            write.write(piece)
            write.flush()
        write.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})
        replies += 1
