"""``tunelab config``: show and validate configurations."""

from __future__ import annotations

from pathlib import Path

import typer

from tunelab.config.load import dump_config, load_config

app = typer.Typer(help="Show and validate configurations.", no_args_is_help=True)


@app.command("show")
def show(
    config: Path | None = typer.Argument(None, help="A YAML config file (optional)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. data.max_seq_len=512."
    ),
) -> None:
    """Validate a config and print it resolved, with every default filled in."""
    if config is not None and "=" in str(config):  # only overrides were given
        overrides = [str(config), *(overrides or [])]
        config = None
    print(dump_config(load_config(config, overrides)), end="")
