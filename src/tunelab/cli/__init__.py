"""The ``tunelab`` command.

Every user error (:class:`~tunelab.errors.TunelabError`) is printed as ``error: ...`` without a
traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from tunelab import __version__
from tunelab.cli import chat as chat_cli
from tunelab.cli import config as config_cli
from tunelab.cli import data as data_cli
from tunelab.cli import doctor as doctor_cli
from tunelab.cli import evaluate as eval_cli
from tunelab.cli import lr_find as lr_find_cli
from tunelab.cli import models as models_cli
from tunelab.cli import plan as plan_cli
from tunelab.cli import serve as serve_cli
from tunelab.cli import ship as ship_cli
from tunelab.cli import train as train_cli
from tunelab.errors import TunelabError
from tunelab.train.speed import use_inductor_cache

# torch's inductor fixes its cache folder the first time anything asks, and importing
# transformers asks (it sets TORCHINDUCTOR_CACHE_DIR to a folder under /tmp): tunelab's cache,
# where `train.compile: auto` and `tunelab plan` look, is set before the commands import it.
use_inductor_cache()

app = typer.Typer(
    name="tunelab",
    help="Fine-tune language models, with the workflow around training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train_cli.train)
app.command("eval")(eval_cli.eval_command)
app.command("baseline")(eval_cli.baseline_command)
app.command("compare")(eval_cli.compare_command)
app.command("doctor")(doctor_cli.doctor)
app.command("lr-find")(lr_find_cli.lr_find)
app.command("plan")(plan_cli.plan)
app.command("merge")(ship_cli.merge)
app.command("export")(ship_cli.export)
app.command("serve")(serve_cli.serve)
app.command("chat")(chat_cli.chat)
app.add_typer(data_cli.app, name="data")
app.add_typer(config_cli.app, name="config")
app.add_typer(models_cli.app, name="models")


def _version(value: bool) -> None:
    if value:
        print(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """Fine-tune language models, with the workflow around training."""


def main(argv: list[str] | None = None) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):  # click returns a typer.Exit's code in this mode
            return result
    except TunelabError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(str(e))}", markup=True
        )
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # usage errors: missing argument, bad option value
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
