"""``tunelab eval``, ``tunelab baseline`` and ``tunelab compare``."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tunelab.cli.progress import counting_bar
from tunelab.config.load import flag_overrides

_OUT = typer.Option(Path("eval"), "--out", "-o", help="Evaluations are written to OUT/<name>/.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
_LIMIT = typer.Option(None, "--limit", help="Only the first N examples.")
_METRIC = typer.Option(
    None, "--metric", help="Your metric: 'module:function' or 'file.py:function'."
)
_CONFIG = typer.Option(
    None, "--config", "-c", help="Read the eval section (and data settings) from this YAML."
)
_SHEET = typer.Option(
    None, "--sheet", help="Also write a blind human-rating sheet (CSV + key); eval.sheet."
)


def _eval_config(config: Path | None, overrides: list[str]):
    from tunelab.config.load import load_config

    return load_config(config, overrides)


def _rating_sheet(runs, folder: Path, prefix: str = "") -> tuple[Path, Path]:
    """A blind rating sheet (``folder/<prefix>rating_sheet.csv`` and its key) over the examples
    every one of ``runs`` (loaded evaluations) answered; the systems are the runs' names."""
    from tunelab.evaluate.compare import alignment_keys, common_keys
    from tunelab.evaluate.sheet import write_rating_sheet

    by_run = alignment_keys(runs)
    first = by_run[0]
    keys = common_keys(by_run)
    return write_rating_sheet(
        folder, [first[k]["prompt"] for k in keys], [first[k]["reference"] for k in keys],
        {run.name: [m[k]["prediction"] for k in keys] for run, m in zip(runs, by_run, strict=True)},
        prefix=prefix,
    )  # fmt: skip


def _judge(cfg):
    j = cfg.eval.judge
    if j.base_url:
        from tunelab.evaluate.judge import DEFAULT_KEY_ENV, DEFAULT_RUBRIC, HTTPJudge

        if not j.model:
            from tunelab.errors import ConfigError

            raise ConfigError("eval.judge.model: missing (the endpoint's model id)")
        return HTTPJudge(
            j.base_url,
            j.model,
            api_key_env=j.api_key_env or DEFAULT_KEY_ENV,
            rubric=j.rubric or DEFAULT_RUBRIC,
        )
    if j.model:
        from tunelab.evaluate.generate import GenerationOptions, generate
        from tunelab.evaluate.judge import DEFAULT_RUBRIC, LocalJudge
        from tunelab.evaluate.run import load_target

        local = load_target(j.model)
        options = GenerationOptions(max_new_tokens=64, batch_size=cfg.eval.batch_size)
        return LocalJudge(
            lambda convs: generate(local.model, local.tokenizer, convs, options),
            rubric=j.rubric or DEFAULT_RUBRIC,
        )
    return None


def _refuse_generation_settings(cfg) -> None:
    """Settings that score generated answers mean nothing for preference pairs: an error rather
    than a metric silently missing from the evaluation."""
    from tunelab.errors import ConfigError

    for key, value in (("eval.metric", cfg.eval.metric), ("eval.judge.model", cfg.eval.judge.model),
                       ("eval.judge.base_url", cfg.eval.judge.base_url)):  # fmt: skip
        if value:
            raise ConfigError(
                f"{key}: {value!r} scores generated answers, but eval.data {cfg.eval.data} holds "
                "preference pairs, which are scored by log-probability without generating: "
                "drop the setting, or evaluate a file of conversations"
            )


def _placement_override(cfg):
    """The model settings to load with when model.precision or model.device was given (in the
    YAML or as an override); None: a run's own settings (or auto for a plain model)."""
    return cfg.model if {"precision", "device"} & cfg.model.model_fields_set else None


def _slug(text: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if Path(text).exists() else text).strip(
            "-"
        )
        or "model"
    )


_SHOWN = ("exact_match", "json_equal", "task", "bleu", "rougeL", "loss", "judge",
          "preference_accuracy", "preference_accuracy_sum")  # fmt: skip


def _interval(ci) -> str:
    """`` [lo, hi]`` of a metric's 95 % interval in metrics.json (``<metric>_ci95``), if any."""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""


def _show(meta: dict, folder: Path, console: Console) -> None:
    m = meta["metrics"]
    shown = ", ".join(
        f"{k} {v:.3f}" + _interval(m.get(f"{k}_ci95"))
        for k, v in m.items()
        if isinstance(v, float) and k in _SHOWN
    )
    what = "pairs" if meta.get("kind") == "preference" else "examples"
    console.print(
        f"{meta['name']}: {meta['examples']} {what}, {shown} ({meta['seconds']:.0f} s) -> {folder}",
        soft_wrap=True,
    )
    for failure in meta.get("judge_failures", [])[:5]:
        console.print(f"[yellow]judge failure:[/] {failure}")
    from tunelab.evaluate.run import metric_failure_lines

    for i, line in enumerate(metric_failure_lines(meta)):
        console.print(f"[yellow]{escape(line)}[/]" if i == 0 else escape(line), soft_wrap=True)


def eval_command(
    target: str = typer.Argument(
        ..., help="A run folder (its fine-tune) or a model: catalog name, folder, .gguf, hub id."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. eval.max_new_tokens=64."
    ),
    data: Path | None = typer.Option(None, "--data", "-d", help="The held-out test file."),
    name: str | None = typer.Option(
        None, "--name", help="Name of this evaluation (default: from the target)."
    ),
    out: Path = _OUT,
    metric: str | None = _METRIC,
    limit: int | None = _LIMIT,
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge endpoint."
    ),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="Judge model (endpoint id or local model)."
    ),
    sheet: bool | None = _SHEET,
    config: Path | None = _CONFIG,
    quiet: bool = _QUIET,
) -> None:
    """Generate answers for a held-out set and score them (exact, JSON, BLEU, ROUGE, loss, yours, judge);
    for preference pairs: which answer the model finds more likely (preference accuracy)."""
    from tunelab.evaluate.preference import evaluate_pairs, load_eval_data
    from tunelab.evaluate.run import check_metric_ran, evaluate_examples, load_target

    flags = flag_overrides(
        "eval", data=str(data) if data else None, metric=metric, limit=limit, sheet=sheet
    )
    flags += [f"eval.judge.base_url={judge_url}"] if judge_url else []
    flags += [f"eval.judge.model={judge_model}"] if judge_model else []
    cfg = _eval_config(config, flags + list(overrides or []))
    if not cfg.eval.data:
        from tunelab.errors import ConfigError

        raise ConfigError("eval.data: missing (pass --data TEST_FILE)")
    pairs, examples = load_eval_data(cfg.eval.data, cfg.data, cfg.eval.limit)
    if pairs:
        _refuse_generation_settings(cfg)
    if cfg.eval.metric:
        from tunelab.evaluate.metrics import load_user_metric

        load_user_metric(cfg.eval.metric)
    judge = _judge(cfg)
    console = Console(stderr=True, highlight=False)
    loaded = load_target(target, _placement_override(cfg))
    label = name or _slug(target)
    with counting_bar(console, quiet) as progress:
        task = progress.add_task(f"{'scoring pairs' if pairs else 'generating'} ({label})", total=len(examples))  # fmt: skip

        def advance(n: int) -> None:
            progress.advance(task, n)

        if pairs:
            meta = evaluate_pairs(loaded, examples, cfg.eval, out, name=label,
                                  data_label=str(cfg.eval.data), data_cfg=cfg.data, on_progress=advance)  # fmt: skip
        else:
            meta = evaluate_examples(
                loaded, examples, cfg.eval, out, name=label, data_label=str(cfg.eval.data),
                on_progress=advance, judge=judge,
            )  # fmt: skip
    _show(meta, out / label, console)
    if cfg.eval.sheet and pairs:
        console.print("no rating sheet: preference pairs are scored, nothing was generated to rate")
    elif cfg.eval.sheet:
        from tunelab.evaluate.compare import load_eval

        paths = _rating_sheet([load_eval(out / label)], out / label)
        console.print(f"rating sheet: {paths[0]} (key: {paths[1]})")
    check_metric_ran(meta, out / label)  # after writing: the answers can be read


def baseline_command(
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. eval.max_new_tokens=64."
    ),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", "-m", help="The base model to prompt."
    ),
    data: Path = typer.Option(..., "--data", "-d", help="The held-out test file."),
    shots: str | None = typer.Option(
        None, "--shots", help="Comma-separated shot counts, e.g. 0,3,5 (eval.shots, default 0,3)."
    ),
    train: Path | None = typer.Option(
        None, "--train", help="Where shots come from (the training split)."
    ),
    instruction: str | None = typer.Option(
        None,
        "--instruction",
        help="Extra instruction added to the system prompt (eval.instruction).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Which shots are drawn (eval.shot_seed, default 0)."
    ),
    prefix: str = typer.Option("base", "--prefix", help="Evaluations are named PREFIX-<k>shot."),
    out: Path = _OUT,
    metric: str | None = _METRIC,
    limit: int | None = _LIMIT,
    sheet: bool | None = _SHEET,
    config: Path | None = _CONFIG,
    quiet: bool = _QUIET,
) -> None:
    """The prompt baseline a fine-tune must beat: the base model zero-shot and k-shot on the test set."""
    from tunelab.errors import ConfigError
    from tunelab.evaluate.run import (
        check_metric_ran,
        evaluate_examples,
        load_eval_examples,
        load_target,
        pick_shots,
    )

    shot_counts = None
    if shots is not None:
        try:
            shot_counts = [int(x) for x in shots.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--shots {shots!r}: expected comma-separated integers, e.g. 0,3,5"
            ) from None
    flags = flag_overrides("eval",
        data=str(data), metric=metric, limit=limit, shots=shot_counts, shot_seed=seed,
        instruction=instruction, sheet=sheet,
    )  # fmt: skip
    cfg = _eval_config(config, flags + list(overrides or []))
    counts = cfg.eval.shots
    if any(counts) and train is None:
        raise ConfigError(
            "--train: k-shot prompts need the training split to draw shots from (never the test set)"
        )
    examples = load_eval_examples(data, cfg.data, cfg.eval.limit)
    pool = load_eval_examples(train, cfg.data) if train else []
    chosen = {
        k: pick_shots(pool, k, cfg.eval.shot_seed, examples) for k in counts
    }  # every error before loading a model
    if cfg.eval.metric:
        from tunelab.evaluate.metrics import load_user_metric

        load_user_metric(cfg.eval.metric)
    console = Console(stderr=True, highlight=False)
    loaded = load_target(model, _placement_override(cfg))
    for k in counts:
        label = f"{prefix}-{k}shot"
        with counting_bar(console, quiet) as progress:
            task = progress.add_task(f"generating ({label})", total=len(examples))
            meta = evaluate_examples(
                loaded, examples, cfg.eval, out, name=label, data_label=str(data), shots=chosen[k],
                instruction=cfg.eval.instruction,
                on_progress=lambda n, t=task, p=progress: p.advance(t, n),
            )  # fmt: skip
        _show(meta, out / label, console)
        check_metric_ran(meta, out / label)  # a broken metric: stop before the next shot count
    if cfg.eval.sheet:  # one blind sheet over every shot count, next to the evaluations
        from tunelab.evaluate.compare import load_eval

        labels = dict.fromkeys(f"{prefix}-{k}shot" for k in counts)
        paths = _rating_sheet([load_eval(out / x) for x in labels], out, prefix=f"{prefix}-")
        console.print(f"rating sheet: {paths[0]} (key: {paths[1]})")


def compare_command(
    evals: list[Path] = typer.Argument(..., help="Evaluation folders; the first is the baseline."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where compare.md/.html go (default: next to the first)."
    ),
    sheet: bool = typer.Option(
        False, "--sheet", help="Also write a blind human-rating sheet (CSV + key)."
    ),
    allow_different_references: bool = typer.Option(
        False,
        "--allow-different-references",
        help="Compare even when the evaluations' references differ (the test file changed).",
    ),
) -> None:
    """Compare evaluations: every metric, differences with paired-bootstrap 95% intervals, flips."""
    from tunelab.evaluate.compare import compare, format_table, load_eval, write_report

    runs = [load_eval(p) for p in evals]
    result = compare(runs, allow_different_references=allow_different_references)
    folder = out or evals[0].parent
    md, html = write_report(result, folder)
    print(format_table(result))
    print(f"report: {md} and {html}")
    if sheet:
        paths = _rating_sheet(runs, folder)
        print(f"rating sheet: {paths[0]} (key: {paths[1]})")
