"""``tunelab serve``: a base model and its LoRA adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def serve(
    model: str = typer.Option(
        ..., "--model", "-m", help="The base model (catalog name, folder, .gguf, run folder)."
    ),
    adapter: list[str] | None = typer.Option(
        None, "--adapter", help="name=RUN_DIR, a LoRA run on this base; repeat for more."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (default: this machine only)."
    ),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require this key (default: $TUNELAB_API_KEY if set)."
    ),
    max_queue: int = typer.Option(
        16, "--max-queue", min=1, help="Requests that may wait; more get 429."
    ),
    max_tokens: int = typer.Option(
        256, "--max-tokens", min=1, help="Default max_tokens of a request."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Serve MODEL and its adapters: /v1/models, /v1/chat/completions, /v1/completions, /health."""
    import uvicorn

    from tunelab.errors import ConfigError
    from tunelab.serve.app import create_app
    from tunelab.serve.engine import Engine, RequestError

    pairs = []
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec}: expected name=RUN_DIR")
        pairs.append((name, Path(path)))
    engine = Engine(model, device=device, max_queue=max_queue)
    for name, path in pairs:
        try:
            engine.add_adapter(name, path)
        except RequestError as e:
            raise ConfigError(f"--adapter {name}={path}: {e}") from None
    key = api_key or os.environ.get("TUNELAB_API_KEY")
    app = create_app(engine, api_key=key, default_max_tokens=max_tokens)
    print(f"serving {', '.join(engine.models)} on http://{host}:{port}/v1"
          + (" (API key required)" if key else ""), flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
