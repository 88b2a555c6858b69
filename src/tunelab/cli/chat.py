"""``tunelab chat RUN_DIR|MODEL``: an interactive chat in the terminal, streamed."""

from __future__ import annotations

import typer


def chat(
    target: str = typer.Argument(..., help="A run folder or any model name, folder or .gguf file."),
    system: str | None = typer.Option(None, "--system", help="A system prompt."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, max=2.0, help="0: greedy."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.01, max=1.0),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Chat with a fine-tune (or any model) in the terminal: /reset, /exit."""
    from tunelab.serve.chat import chat_loop
    from tunelab.serve.engine import Engine

    engine = Engine(target, device=device, max_queue=1)
    chat_loop(engine, system=system, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
