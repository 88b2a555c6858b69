"""``tunelab plan [run.yaml] [overrides]``: will it fit, how long, what cost, which settings —
before the run, without reading weights."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def plan(
    config: Path | None = typer.Argument(None, help="A YAML config, as for tunelab train."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides."),
    write: Path | None = typer.Option(None, "--write", help="Write the recommended config here."),
    as_json: bool = typer.Option(False, "--json", help="Print the quote as JSON."),
    lr_find: Path | None = typer.Option(
        None,
        "--lr-find",
        help="An lr_find.json to take the lr from (default: <output_dir>/lr-find).",
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Processes the run will use (tunelab train --nproc N): what each holds, and the "
        "total on this machine.",
    ),  # fmt: skip
) -> None:
    """Quote a run: memory by component and what fits where, steps, time, cost, and the
    recommended settings with their reasons."""
    from tunelab.config.load import dump_config, load_config
    from tunelab.files import atomic_write_text
    from tunelab.workflow.advise import advise, apply_advice
    from tunelab.workflow.quote import make_quote

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    cfg = load_config(config, overrides or [])
    quote = make_quote(cfg)
    advice = advise(quote, lr_find=lr_find)
    if write is not None:
        atomic_write_text(write, dump_config(apply_advice(cfg, advice)))
    processes = processes_plan(quote, nproc)
    if as_json:
        print(
            json.dumps(
                {
                    **quote.as_dict(),
                    "advice": [a.to_dict() for a in advice],
                    "processes": processes,
                },
                indent=2,
                default=str,
            )  # fmt: skip
        )
        return
    show(quote, advice, processes["note"])
    if write is not None:
        print(f"written: {write} (the recommended config)")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _hours(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def processes_plan(quote, nproc: int) -> dict:
    """What N processes hold — ddp: each the whole model, its optimizer state and one
    micro-batch's activations (the peak above); fsdp: each a 1/N share of the decoder layers'
    weights, gradients and AdamW state — and, on a CPU, their total against the RAM."""
    from tunelab.models.methods import get_method
    from tunelab.train.distributed import World, choose_distributed
    from tunelab.workflow.quote import process_peak, ram_bytes

    method = get_method(quote.cfg.method)
    kind = choose_distributed(quote.cfg.train.distributed, World(0, nproc), method)[0]
    peak = process_peak(quote, nproc, kind)
    out = {"nproc": nproc, "distributed": kind, "peak_per_process": peak, "peak_all": peak * nproc}
    if nproc == 1:
        return out | {
            "note": "processes: one (tunelab train --nproc N: each process holds the peak above)"
        }
    what = "each holds the whole model and its optimizer state" if kind == "ddp" else \
        f"each holds 1/{nproc} of the decoder layers' weights, gradients and AdamW state"  # fmt: skip
    line = f"processes: {nproc} ({kind}: {what}, {_gib(peak)} a process"
    if quote.here == "cpu":
        ram = ram_bytes()
        verdict = "fits" if nproc * peak <= ram else "does NOT fit"
        return out | {
            "note": line
            + f"; {_gib(nproc * peak)} in all on this machine's {_gib(ram)}: {verdict})"
        }
    return out | {"note": line + "; one GPU each)"}


def show(quote, advice, processes: str = "") -> None:
    from tunelab.workflow.quote import training_precision

    console = Console(highlight=False, soft_wrap=True)
    cfg, d, m, s = quote.cfg, quote.data, quote.memory, quote.shape
    console.print(f"[bold]model[/]   {escape(cfg.model.name)}: {s.family}, {s.params / 1e6:,.1f}M parameters "
                  f"({s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,})")  # fmt: skip
    seqs, length = d.worst_batch
    console.print(f"[bold]data[/]    {d.examples:,} training {'pairs' if d.pairs else 'examples'}, "
                  f"{d.tokens:,} tokens an epoch (median {d.median_len}, longest {d.max_len}); "
                  f"{d.weighted_share:.0%} of targets carry loss weight")  # fmt: skip
    console.print(f"[bold]method[/]  {cfg.method.name}, {m.trainable:,} trainable parameters; "
                  f"largest micro-batch: {seqs} sequences x {length} tokens (padded)")  # fmt: skip
    precision = training_precision(cfg, quote.here, s.hidden)
    table = Table(
        title=f"memory on {'this machine' if quote.runs_here else 'a CUDA GPU'}: {quote.here} ({precision})",
        title_justify="left",
    )
    table.add_column("component")
    table.add_column("size", justify="right")
    for key, value in m.as_dict().items():
        if key in ("tensors", "trainable") or (not value and key != "gradients"):
            continue
        table.add_row(
            "peak (at the worst moment of the step)" if key == "peak" else key, _gib(value)
        )
    console.print(table)
    console.print(f"  sanity: the common rule '~2.5 x the weights' (16-bit) says {_gib(quote.rule_of_thumb)}; "
                  "components do not all peak at once, so the peak is less than their sum")  # fmt: skip
    if processes:
        console.print(f"  {escape(processes)}")
    fit = Table(title="fit, time and cost", title_justify="left")
    for col in ("device", "memory", "fits", "largest micro-batch", "accumulation", "time", "cost"):
        fit.add_column(col, justify="left" if col == "device" else "right")
    for dev in quote.devices:
        seconds = quote.seconds if dev is quote.devices[0] else dev.hours * 3600
        time = "-" if seconds is None else _hours(seconds)
        fit.add_row(escape(dev.name), f"{dev.memory_gib:,.0f} GiB", "yes" if dev.fits else "[red]no[/]",
                    str(dev.max_micro_batch), str(dev.grad_accum) if dev.grad_accum else "-", time,
                    _money(dev.cost))  # fmt: skip
    console.print(fit)
    console.print(f"  steps: {quote.steps_per_epoch} per epoch, {quote.total_steps} in all; "
                  f"{quote.flops_per_token / 1e9:.2f} GFLOP per token; this machine: "
                  f"{escape(quote.throughput_source)}; cards: {_card_mfus(quote)}")  # fmt: skip
    if quote.compile[1]:
        console.print(f"  {escape(quote.compile[1])}")
    if quote.api_costs:
        console.print(
            "  hosted fine-tuning APIs, same tokens: "
            + ", ".join(f"{k} {_money(v)}" for k, v in quote.api_costs.items())
        )
    for change, peak in quote.savings:
        console.print(f"  [bold]what would fit[/]: {escape(change)} -> peak {_gib(peak)} "
                      f"(saves {_gib(quote.memory.peak - peak)})")  # fmt: skip
    for w in quote.warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}")
    console.print("[bold]recommended[/] (--write FILE writes a config with them):")
    for a in advice:
        now = cfg.method.lora_alpha if a.setting == "method.alpha" else _now(cfg, a.setting)
        same = "" if now == a.value else f"  [yellow](now {now})[/]"
        console.print(f"  [bold]{a.setting}={a.value}[/]{same}: {escape(a.reason)}")
        console.print(f"      evidence: {escape(a.evidence)}")


def _card_mfus(quote) -> str:
    cards = [d for d in quote.devices if d.mfu is not None]
    measured = [
        f"{d.name} {d.mfu:.0%} ({d.mfu_source})" for d in cards if d.mfu_source != "assumed"
    ]
    assumed = f"{quote.cfg.plan.mfu:.0%} MFU assumed"
    return "; ".join(measured + ([f"others {assumed}"] if measured else [assumed]))


def _now(cfg, setting: str):
    section, key = setting.split(".", 1)
    return getattr(getattr(cfg, section), key)


def _money(cost: float | None) -> str:
    if cost is None:
        return "-"
    return "<$0.01" if cost < 0.01 else f"${cost:,.2f}"
