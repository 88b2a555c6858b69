"""``tunelab train``: fine-tune a model from a YAML config and dotted overrides."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunelab.cli.progress import progress_bar


def train(
    config: Path | None = typer.Argument(
        None, help="A YAML config (optional: every setting has a default)."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. train.lr=1e-4 data.path=x.jsonl."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the run in this folder from its last checkpoint."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (for CI and logs)."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check everything and print the run plan; load no weights, train nothing.",
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Processes on this machine: this command run N times by torch's launcher, as "
        "`torchrun --standalone --nproc-per-node N` does (several machines: call torchrun "
        "yourself, docs/distributed.md).",
    ),  # fmt: skip
) -> None:
    """Fine-tune a model. Writes a run folder: config, metrics, checkpoints, final adapter, plot, summary."""
    from tunelab.config.load import load_config
    from tunelab.train.distributed import world_from_env
    from tunelab.train.plan import load_resume_config
    from tunelab.workflow.finetune import finetune, plan_finetune

    world = world_from_env()
    if nproc > 1 and not world.several and not dry_run:
        _torchrun(nproc)

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    if resume is not None:
        if config is not None:
            raise typer.BadParameter(
                "give either a config or --resume RUN_DIR (the run's own config is used)"
            )
        cfg = load_resume_config(resume, overrides or [])
    else:
        cfg = load_config(config, overrides or [])
    if dry_run:
        if nproc > 1 and not world.several:  # the plan as rank 0 of nproc will see it
            world = type(world)(size=nproc, local_size=nproc)
        print(plan_finetune(cfg, resume=resume, read_weights=False, world=world).describe())
        return
    console = Console(stderr=True, highlight=False)
    progress = progress_bar(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, quiet=quiet or not world.main,
    )  # fmt: skip
    task = None
    last_eval = ""

    def on_step(step: int, total: int, record: dict) -> None:
        nonlocal task, last_eval
        if "eval_loss" in record:
            last_eval = f" val {record['eval_loss']:.4f}"
            if quiet:
                ppl = f" ppl {record['eval_ppl']:.2f}" if "eval_ppl" in record else ""
                accuracy = record.get("eval_reward_accuracy")
                pref = f" reward accuracy {accuracy:.3f}" if accuracy is not None else ""
                console.print(f"step {step}/{total} eval_loss {record['eval_loss']:.4f}{ppl}{pref}")
        if task is None:
            task = progress.add_task("train", total=total, completed=step - 1, info="")
        tps = record.get("tokens_per_s")
        info = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} {tps or 0:,.0f} tok/s{last_eval}"
                if "loss" in record else f"{last_eval}")  # fmt: skip
        progress.update(task, completed=step, info=info)
        if quiet and "loss" in record and (step % 10 == 0 or step == total):
            console.print(f"step {step}/{total} {info}")

    with progress:
        run_dir = finetune(cfg, resume=resume, progress=on_step, log=console.print)
    if world.main:
        _print_result(run_dir)


def _torchrun(nproc: int) -> None:
    """Run this very command as ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc-per-node N`` does (torch's own launcher, called as a library), and exit with the
    job's code; a rank that fails is named in one line, without the launcher's traceback."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from tunelab.errors import TunelabError

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)  # fmt: skip
    sys.stdout.flush()
    try:
        elastic_launch(config, sys.executable)("-m", "tunelab", *args)
    except ChildFailedError as e:
        rank, failure = _root_failure(e)
        if failure.exitcode == TunelabError.exit_code:  # the rank said why, above
            print(f"error: rank {rank} of {nproc} stopped on the error above; the job stopped "
                  "(every rank)", file=sys.stderr)  # fmt: skip
            raise SystemExit(failure.exitcode) from None
        how = (f"was stopped by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")  # fmt: skip
        print(f"error: rank {rank} of {nproc} {how}; the job stopped (every rank). The last "
              "complete checkpoint is intact: continue with tunelab train --resume RUN_DIR "
              f"--nproc {nproc}", file=sys.stderr)  # fmt: skip
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 1) from None
    raise SystemExit(0)


def _root_failure(error):
    """(rank, failure) that ended the job. The launcher's first failure is not reliable: the
    ranks' exit times can land in one poll. So, first, a rank that exited with a code of its own
    (a crash, not a tunelab error); then one killed by a signal other than the SIGTERM the
    launcher sends the survivors (the kernel's OOM killer); then a tunelab error; the earliest
    within each kind."""
    import signal

    from tunelab.errors import TunelabError

    def kind(failure) -> int:
        if failure.exitcode > 0:
            return 0 if failure.exitcode != TunelabError.exit_code else 2
        return 3 if failure.exitcode == -signal.SIGTERM else 1

    rank = min(
        error.failures, key=lambda r: (kind(error.failures[r]), error.failures[r].timestamp, r)
    )
    return rank, error.failures[rank]


def _print_result(run_dir: Path) -> None:
    import json

    result = json.loads((run_dir / "result.json").read_text())
    before, best = result.get("initial_eval_loss"), result.get("best_eval_loss")
    if before is not None and best is not None:
        print(
            f"validation loss: {before:.4f} before training -> {best:.4f} best (step {result['best_step']})"
        )
    print(f"{result['steps']} steps in {result['seconds']:.0f} s, {result.get('tokens_per_s') or 0:.0f} tokens/s, "
          f"peak memory {result.get('peak_gpu_gib') or result['peak_rss_gib']} GiB")  # fmt: skip
    if result.get("final"):
        print(f"final/ holds {result['final']}")
    doctor = run_dir / "doctor.md"
    if doctor.is_file():
        kinds = [
            line[3:].strip() for line in doctor.read_text().splitlines() if line.startswith("## ")
        ]
        print(f"doctor: {', '.join(kinds)} (doctor.md: the evidence and what to change)")
    print(f"run folder: {run_dir} (summary.md, train_loss.png, doctor.md, final/)")
