"""``tunelab doctor RUN_DIR``: what is wrong with a run's loss curve, and what to change."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape


def doctor(
    run_dir: Path = typer.Argument(..., help="A run folder (with metrics.jsonl)."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as a JSON list."),
) -> None:
    """Diagnose a run's loss curve; writes doctor.md and doctor.png into the run folder."""
    from tunelab.train.doctor import read_run, write_doctor

    records, info = read_run(run_dir)
    findings = write_doctor(run_dir, records, info)
    if as_json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
        return
    console = Console(highlight=False, soft_wrap=True)
    for f in findings:
        color = "green" if f.kind == "healthy" else "yellow" if f.kind == "too_short" else "red"
        console.print(f"[bold {color}]{f.kind}[/]")
        console.print(f"  evidence: {escape(f.evidence)}")
        console.print(f"  advice:   {escape(f.advice)}")
    console.print(f"written: {escape(str(run_dir / 'doctor.md'))}, doctor.png")
