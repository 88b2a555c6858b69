"""A fine-tune as a user runs it: check everything cheap, plan, train, then evaluate.

    plan_finetune(cfg)      the eval inputs checked, then the run plan (no weights read)
    finetune(cfg)           plan -> prepare -> general-ability "before" -> train -> finish
                            -> the fine-tune on eval.data and the forgetting check "after"

The evaluation after training loads the run folder's ``final/`` like ``tunelab eval RUN_DIR``
does, so it scores exactly the weights that were shipped (``train.keep``).
"""

from __future__ import annotations

import gc
from pathlib import Path

from tunelab.config.schema import Config
from tunelab.errors import DataError, Problem
from tunelab.evaluate.compare import paired_bootstrap
from tunelab.evaluate.metrics import load_user_metric
from tunelab.evaluate.preference import evaluate_pairs, load_eval_data
from tunelab.evaluate.run import (
    Target,
    check_metric_ran,
    evaluate_examples,
    load_eval_examples,
    load_target,
    metric_failure_lines,
)
from tunelab.files import read_jsonl
from tunelab.models.device import choose_placement
from tunelab.train.distributed import ONE, World, start, stop, world_from_env
from tunelab.train.plan import RunPlan, build_plan
from tunelab.train.recipe import finish, prepare, train
from tunelab.workflow.rehearse import rehearse


def plan_finetune(cfg: Config, *, resume: Path | None = None, read_weights: bool = True,
                  world: World = ONE) -> RunPlan:  # fmt: skip
    """Every input checked (evaluation files included), the run planned; no weights loaded."""
    if cfg.eval.at_end:  # what is evaluated after training must be readable before it
        check_eval_inputs(cfg)
    return build_plan(cfg, resume=resume, read_weights=read_weights, world=world)


def finetune(cfg: Config, *, resume: Path | None = None, progress=None, log=print) -> Path:
    """Train ``cfg`` (or continue the run folder ``resume``); return the run folder. Started
    by torchrun, this process is one rank of several (train/distributed.py): each trains its
    share of every step and of the generations at the end; rank 0 alone writes and talks."""
    world = world_from_env()
    try:
        start(world, choose_placement(cfg.model).device.type, cfg.train.distributed_timeout_s)
        if not world.main:
            progress, log = None, _silent
        return _finetune(cfg, resume, progress, log, world)
    finally:
        stop()


def _silent(*_args, **_kwargs) -> None:
    pass


def _finetune(cfg: Config, resume: Path | None, progress, log, world: World) -> Path:
    plan = plan_finetune(cfg, resume=resume, world=world)
    run = prepare(plan, progress=progress, log=log)
    rehearse(run, log)  # data.replay=self: the base model's answers, before any step
    general = cfg.eval.at_end and cfg.eval.general_data is not None
    before = None
    if (
        general and plan.fresh and _same_precision(cfg, plan) and not plan.sharded
    ):  # before any step
        target = Target(run.model, plan.tokenizer, f"{cfg.model.name} (before)")
        with run.uncompiled():
            before = _general(cfg, target, plan.run_dir, "general-before", world)
        if world.main:
            log(f"general ability before training: {headline(before)}")
        else:
            before = {}  # done (rank 0 holds the result): not to be redone after training
    run_dir = finish(run, train(run, log))
    world.wait()  # final/ is written before any rank loads it
    if cfg.eval.at_end and (cfg.eval.data or general):
        del run, plan  # the trained model's memory, before final/ is loaded to be evaluated
        gc.collect()
        evaluate_at_end(cfg, run_dir, before, log, world)
    return run_dir


def check_eval_inputs(cfg: Config) -> None:
    for key in ("data", "general_data"):
        path = getattr(cfg.eval, key)
        if path is not None:
            if not Path(path).is_file():
                raise DataError(Problem(str(path), None, None, f"eval.{key}: file not found"))
            if key == "data":  # preference pairs (scored) or conversations (generated)
                load_eval_data(path, cfg.data)
            else:
                load_eval_examples(path)
    if cfg.eval.metric:
        load_user_metric(cfg.eval.metric)


def evaluate_at_end(cfg: Config, run_dir: Path, before: dict | None, log=print,
                    world: World = ONE) -> None:  # fmt: skip
    """eval.at_end: the fine-tuned model (final/) on eval.data, and the forgetting check.
    Several processes generate a share each; rank 0 scores, writes and tells."""
    if cfg.eval.general_data and before is None:  # bf16 training, or a resumed run
        before = _before_from_base(cfg, run_dir, log, world)
        gc.collect()
    target = load_target(str(run_dir))
    if not world.main:  # this rank's share of the generations, then done
        pairs, examples = load_eval_data(cfg.eval.data, cfg.data, cfg.eval.limit) \
            if cfg.eval.data else (True, [])  # fmt: skip
        if not pairs:  # preference pairs are scored by rank 0 alone
            evaluate_examples(target, examples, cfg.eval, run_dir / "eval", name="finetuned",
                              data_label=cfg.eval.data, spread=world)  # fmt: skip
        if cfg.eval.general_data:
            _general(cfg, target, run_dir, "general-after", world)
        return
    lines = []
    if cfg.eval.data:
        pairs, examples = load_eval_data(cfg.eval.data, cfg.data, cfg.eval.limit)
        if pairs:
            meta = evaluate_pairs(target, examples, cfg.eval, run_dir / "eval", name="finetuned",
                                  data_label=cfg.eval.data)  # fmt: skip
        else:
            meta = evaluate_examples(target, examples, cfg.eval, run_dir / "eval", name="finetuned",
                                     data_label=cfg.eval.data, spread=world)  # fmt: skip
        lines.append(
            f"test set ({meta['examples']} {'pairs' if pairs else 'examples'}): {headline(meta)} "
            f"-> {run_dir / 'eval' / 'finetuned'}"
        )
        lines += metric_failure_lines(meta)
    if cfg.eval.general_data:
        after = _general(cfg, target, run_dir, "general-after", world)
        b = before["metrics"].get("contains") if before else None
        a = after["metrics"].get("contains")
        if isinstance(a, float) and isinstance(b, float):
            lines.append(f"general ability (forgetting check, answer contained): {b:.3f} before -> "
                         f"{a:.3f} after ({a - b:+.3f}{forgetting_interval(run_dir)})")  # fmt: skip
            lines += forgetting_advice(cfg, a - b)
        else:
            lines.append(f"general ability after training: {headline(after)}")
    for line in lines:
        log(line)
    with open(run_dir / "summary.md", "a", encoding="utf-8") as f:
        f.write("\n## Evaluation at the end\n\n" + "".join(f"- {line}\n" for line in lines))
    if cfg.eval.data and not pairs:  # a metric that never ran is an error, once all is written
        check_metric_ran(meta, run_dir / "eval" / "finetuned")


#: A drop of the forgetting check beyond this (answer contained) gets the study's remedy.
FORGETTING_TOLERANCE = 0.05


def forgetting_advice(cfg: Config, change: float) -> list[str]:
    """What to do when training cost general ability: what the forgetting study found."""
    if change >= -FORGETTING_TOLERANCE or cfg.data.replay or cfg.stages:
        return []
    return [
        f"forgetting: the general score fell {-change * 100:.1f} points; data.replay=self "
        "(the base model's own answers replayed as a quarter of each step) kept it on the "
        "example task (-16.1 -> +0.4 points, task score held; docs/forgetting.md)"
    ]


def forgetting_interval(run_dir: Path) -> str:
    """The change's 95 % paired bootstrap interval over the forgetting check's questions (each
    answered before and after): ", 95 % CI -0.31 to -0.15"; "" when they cannot be paired."""
    scores = []
    for name in ("general-before", "general-after"):
        rows = read_jsonl(run_dir / "eval" / name / "predictions.jsonl")
        scores.append({r["index"]: r["scores"].get("contains") for _, r in rows})
    keys = sorted(k for k in scores[0] if scores[0][k] is not None and scores[1].get(k) is not None)
    if not keys:
        return ""
    _, lo, hi = paired_bootstrap([scores[0][k] for k in keys], [scores[1][k] for k in keys])
    return f", 95 % CI {lo:+.3f} to {hi:+.3f}"


def _same_precision(cfg: Config, plan: RunPlan) -> bool:
    """Whether training computes in the precision evaluation uses. When it does, the forgetting
    check's "before" runs on the model in memory before the first step; when it does not (bf16
    training on a CPU), "before" is the base loaded as evaluation loads it, after training
    (:func:`evaluate_at_end`) — like with like, and the training steps run in a process no
    evaluation has touched (on a CPU they ran ~14 % slower after it, docs/speed.md)."""
    return choose_placement(cfg.model).precision == plan.placement.precision


def _before_from_base(cfg: Config, run_dir: Path, log=print, world: World = ONE) -> dict | None:
    """The forgetting check on the base model as evaluation loads it; freed on return."""
    target = load_target(cfg.model.name, cfg.model)
    before = _general(cfg, target, run_dir, "general-before", world)
    if before is not None:
        log(f"general ability before training: {headline(before)}")
    return before


def _general(
    cfg: Config, target: Target, run_dir: Path, name: str, world: World = ONE
) -> dict | None:
    """The forgetting check's set: short factual answers, scored by normalised exact match and
    whole-word containment."""
    examples = load_eval_examples(cfg.eval.general_data, limit=cfg.eval.limit)
    settings = cfg.eval.model_copy(
        update={
            "normalize": True,
            "metric": None,
            "max_new_tokens": 32,
            "metrics": ["exact_match", "contains"],
        }
    )
    return evaluate_examples(target, examples, settings, run_dir / "eval", name=name,
                             data_label=cfg.eval.general_data, spread=world)  # fmt: skip


def headline(meta: dict) -> str:
    m = meta["metrics"]
    keys = [
        k
        for k in ("json_equal", "exact_match", "contains", "task", "preference_accuracy")
        if isinstance(m.get(k), float)
    ]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys)
