"""Prepare and run a training job: check everything cheap first, then load, then loop.

Order matters for the user: config and data errors come before any model is loaded; a
mismatched resume is refused before any step runs; the run folder gets the resolved config
first and the final model, plot and summary last.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from tunelab.checkpoint.manager import CheckpointManager
from tunelab.checkpoint.state import fingerprint_diff
from tunelab.config.load import dump_config, load_config
from tunelab.config.schema import Config
from tunelab.data.pipeline import load_examples, tokenize_examples
from tunelab.data.split import split_indices
from tunelab.errors import ConfigError, DataError, Problem, TunelabError
from tunelab.models.adapters import apply_method, count_parameters, save_trained
from tunelab.models.load import load_model, model_fingerprint
from tunelab.train.batches import StepPlan
from tunelab.train.loop import Outcome, Session, resume_from, train_loop
from tunelab.train.loss import SFT
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.report import MetricsLog, plot_losses, write_summary

#: Settings that may change when resuming (extending a run, evaluating more often...).
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_steps", "save_steps", "keep_last", "early_stopping_patience", "eval_at_start",
                     "output_dir", "eval_batch_size", "max_nan_skips"}  # fmt: skip


class ResumeError(TunelabError):
    pass


def check_device(cfg: Config) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """(device, weight dtype, autocast dtype) — or a clear error before anything is loaded."""
    m = cfg.model
    has_cuda = torch.cuda.is_available()
    if m.device == "cuda" and not has_cuda:
        raise ConfigError(
            "model.device: 'cuda' but this machine has no CUDA GPU (use model.device=auto or cpu)"
        )
    device = torch.device(
        "cuda" if (m.device == "cuda" or (m.device == "auto" and has_cuda)) else "cpu"
    )
    if cfg.method.name == "qlora" and device.type != "cuda":
        raise ConfigError(
            "method.name: 'qlora' needs a CUDA GPU (bitsandbytes); on this machine use method.name=lora"
        )
    precision = m.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("model.precision: 'fp16' needs a CUDA GPU (use fp32 or bf16 on the CPU)")
    if precision == "fp32":
        return device, torch.float32, None
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    # Frozen base weights can live in half precision; trained weights stay fp32 under autocast.
    weights = half if cfg.method.name in ("lora", "qlora") else torch.float32
    return device, weights, half


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint(cfg: Config) -> dict:
    """What a checkpoint must agree with to be resumed: model, data, and the settings that shape
    the optimisation (not the ones that only extend or observe it)."""
    fp = {"model": model_fingerprint(cfg.model.name), "data.path": file_digest(cfg.data.path)}
    if cfg.data.val_path:
        fp["data.val_path"] = file_digest(cfg.data.val_path)
    for section in ("method", "data"):
        for k, v in getattr(cfg, section).model_dump(mode="json").items():
            if k not in ("path", "val_path"):
                fp[f"{section}.{k}"] = v
    for k, v in cfg.train.model_dump(mode="json").items():
        if k not in RESUMABLE_CHANGES:
            fp[f"train.{k}"] = v
    return fp


def prepare_run_dir(cfg: Config, resume: Path | None) -> Path:
    if resume is not None:
        return resume
    name = (
        cfg.name or f"{Path(cfg.data.path).stem}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = Path(cfg.train.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"name: run folder {run_dir} already exists (choose another name, or --resume {run_dir})"
        )
    return run_dir


def load_resume_config(run_dir: Path, overrides: list[str]) -> Config:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ResumeError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    return load_config(saved, overrides)


def _datasets(cfg: Config, tokenizer, examples, val_examples):
    if cfg.data.val_path:
        train_ex, val_ex = examples, val_examples
    elif cfg.data.val_ratio > 0:
        idx = split_indices(examples, [1 - cfg.data.val_ratio, cfg.data.val_ratio], cfg.data.seed)
        train_ex, val_ex = [examples[i] for i in idx[0]], [examples[i] for i in idx[1]]
    else:
        train_ex, val_ex = examples, []
    train = tokenize_examples(train_ex, tokenizer, cfg.data)
    val_cfg = cfg.data.model_copy(update={"prompt_loss_weight": 0.0})
    val = tokenize_examples(val_ex, tokenizer, val_cfg).examples if val_ex else []
    return train, val


def run_training(
    cfg: Config, *, resume: Path | None = None, progress=None, log=print, halt_at: int | None = None
) -> Path:
    """Train; return the run folder. ``resume``: a run folder to continue."""
    if cfg.data.path is None:
        raise ConfigError("data.path: missing (the training data file)")
    for key in ("path", "val_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            raise DataError(Problem(str(value), None, None, f"data.{key}: file not found"))
    device, weight_dtype, autocast_dtype = check_device(cfg)
    run_dir = prepare_run_dir(cfg, resume)
    # Validate the data before loading any model (and before hashing it for the fingerprint).
    examples = load_examples(cfg.data.path, cfg.data)
    val_examples = load_examples(cfg.data.val_path, cfg.data) if cfg.data.val_path else None
    if cfg.eval.at_end:  # what is evaluated after training must be readable before it
        _check_eval_inputs(cfg)
    manager = CheckpointManager(run_dir, keep_last=cfg.train.keep_last)
    checkpoint = None
    current_fp = fingerprint(cfg)
    if resume is not None:
        checkpoint = manager.latest()
        if checkpoint is None:
            raise ResumeError(
                f"{run_dir}: no complete checkpoint to resume from (refusing to start afresh)"
            )
        saved_fp = json.loads((checkpoint / "trainer_state.json").read_text()).get(
            "fingerprint", {}
        )
        diff = fingerprint_diff(saved_fp, current_fp)
        if diff:
            raise ResumeError(
                f"cannot resume {run_dir}: it was trained with other settings:\n  "
                + "\n  ".join(diff)
            )
    torch.manual_seed(cfg.train.seed)
    started = time.perf_counter()
    model, tokenizer = load_model(
        cfg.model.name, dtype=weight_dtype, device=str(device), tokenizer=cfg.model.tokenizer,
        quantize_bits=cfg.method.bits if cfg.method.name == "qlora" else None,
    )  # fmt: skip
    train_report, val_set = _datasets(cfg, tokenizer, examples, val_examples)
    train_set = train_report.examples
    t = cfg.train
    if len(train_set) < t.micro_batch_size:
        raise DataError(
            Problem(cfg.data.path, None, None,
                    f"{len(train_set)} usable training examples, fewer than one micro-batch "
                    f"(train.micro_batch_size={t.micro_batch_size})")
        )  # fmt: skip
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:  # first thing in the folder: it is a run folder from now on (resumable)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    general_before = (
        evaluate_general_before(cfg, model, tokenizer, run_dir, log) if checkpoint is None else None
    )
    # Adapters initialise the same way, however the model was loaded:
    torch.manual_seed(cfg.train.seed)
    model = apply_method(model, cfg.method)
    trainable, total = count_parameters(model)
    plan = StepPlan([len(x.seq) for x in train_set], micro_batch_size=t.micro_batch_size,
                    grad_accum=t.grad_accum, seed=t.seed)  # fmt: skip
    total_steps = plan.total_steps(t.epochs, t.max_steps)
    eval_steps = t.eval_steps or max(1, plan.steps_per_epoch // 10)
    save_steps = t.save_steps or eval_steps
    everything = cfg.method.name == "freeze" and cfg.method.unfreeze_every > 0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or everything]
    optimizer = build_optimizer(named, t, device.type)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    session = Session(
        cfg=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, objective=SFT(), train_set=train_set,
        val_set=val_set, optimizer=optimizer, scheduler=scheduler, plan=plan, total_steps=total_steps,
        eval_steps=eval_steps, save_steps=save_steps, device=device, autocast_dtype=autocast_dtype,
        scaler=scaler, fingerprint=current_fp, progress=progress, halt_at=halt_at,
    )  # fmt: skip
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if checkpoint is not None:
        resume_from(session, checkpoint)
        metrics.truncate_after(session.state["step"])
        log(
            f"resuming {run_dir} from {checkpoint.name} (step {session.state['step']} of {total_steps})"
        )
    dropped = sum(train_report.dropped.values())
    log(
        f"run folder: {run_dir}\n"
        f"model {cfg.model.name} on {device.type} ({str(weight_dtype).removeprefix('torch.')}), "
        f"method {cfg.method.name}: {trainable:,} of {total:,} parameters trained\n"
        f"data: {len(train_set)} train / {len(val_set)} val examples"
        + (f" ({dropped} dropped: {dict(train_report.dropped)})" if dropped else "")
        + f"; {total_steps} steps of {t.micro_batch_size} x {t.grad_accum}, eval every {eval_steps}"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    outcome = train_loop(session, metrics, manager)
    _finish(session, outcome, train_report, started, total)
    if cfg.eval.at_end and (cfg.eval.data or cfg.eval.general_data):
        evaluate_at_end(session, general_before, log)
    return run_dir


def _check_eval_inputs(cfg: Config) -> None:
    from tunelab.evaluate.run import load_eval_examples

    for key in ("data", "general_data"):
        path = getattr(cfg.eval, key)
        if path is not None:
            if not Path(path).is_file():
                raise DataError(Problem(str(path), None, None, f"eval.{key}: file not found"))
            load_eval_examples(path, cfg.data if key == "data" else None)
    if cfg.eval.metric:
        from tunelab.evaluate.metrics import load_user_metric

        load_user_metric(cfg.eval.metric)


def evaluate_general_before(cfg: Config, model, tokenizer, run_dir: Path, log) -> dict | None:
    """The forgetting check's 'before': the base model on the general-ability set."""
    if not (cfg.eval.at_end and cfg.eval.general_data):
        return None
    from tunelab.evaluate.run import Target, evaluate_examples, load_eval_examples

    examples = load_eval_examples(cfg.eval.general_data, limit=cfg.eval.limit)
    target = Target(model, tokenizer, f"{cfg.model.name} (before)")
    meta = evaluate_examples(
        target, examples, _general_cfg(cfg), run_dir / "eval", name="general-before",
        data_label=cfg.eval.general_data,
    )  # fmt: skip
    log(f"general ability before training: {_headline(meta)}")
    return meta


def _general_cfg(cfg: Config):
    # Short factual answers: normalised exact match is the meaningful score.
    return cfg.eval.model_copy(
        update={
            "normalize": True,
            "metric": None,
            "max_new_tokens": 32,
            "metrics": ["exact_match", "contains"],
        }
    )


def _headline(meta: dict) -> str:
    m = meta["metrics"]
    keys = [
        k for k in ("json_equal", "exact_match", "contains", "task") if isinstance(m.get(k), float)
    ]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys)


def evaluate_at_end(s: Session, general_before: dict | None, log) -> None:
    """eval.at_end: the fine-tuned model on eval.data, and the forgetting check."""
    from tunelab.evaluate.run import Target, evaluate_examples, load_eval_examples
    from tunelab.models.adapters import merge_and_unload

    cfg = s.cfg
    model = merge_and_unload(s.model).eval()  # after the final save: merging is safe now
    target = Target(
        model, s.tokenizer, f"{cfg.model.name} + {s.run_dir.name}", str(s.run_dir / "final")
    )
    lines = []
    if cfg.eval.data:
        examples = load_eval_examples(cfg.eval.data, cfg.data, cfg.eval.limit)
        meta = evaluate_examples(
            target,
            examples,
            cfg.eval,
            s.run_dir / "eval",
            name="finetuned",
            data_label=cfg.eval.data,
        )
        lines.append(
            f"test set ({meta['examples']} examples): {_headline(meta)} -> {s.run_dir / 'eval' / 'finetuned'}"
        )
    if general_before is not None:
        examples = load_eval_examples(cfg.eval.general_data, limit=cfg.eval.limit)
        after = evaluate_examples(
            target, examples, _general_cfg(cfg), s.run_dir / "eval", name="general-after",
            data_label=cfg.eval.general_data,
        )  # fmt: skip
        b, a = general_before["metrics"].get("contains"), after["metrics"].get("contains")
        if isinstance(a, float) and isinstance(b, float):
            lines.append(
                f"general ability (forgetting check, answer contained): {b:.3f} before -> {a:.3f} after ({a - b:+.3f})"
            )
    for line in lines:
        log(line)
    with open(s.run_dir / "summary.md", "a", encoding="utf-8") as f:
        f.write("\n## Evaluation at the end\n\n" + "".join(f"- {line}\n" for line in lines))


def _peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gib = rss / (2**30 if sys.platform == "darwin" else 2**20)
    out = {"peak_rss_gib": round(rss_gib, 2)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _finish(s: Session, outcome: Outcome, train_report, started: float, total_params: int) -> None:
    final = s.run_dir / "final"
    tmp = s.run_dir / ".final.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_trained(s.model, s.cfg.method, tmp)
    s.tokenizer.save_pretrained(tmp)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    records = MetricsLog.read(s.run_dir / "metrics.jsonl")
    plot_losses(records, s.run_dir / "train_loss.png")
    info = {
        "name": s.run_dir.name, "model": s.cfg.model.name, "method": s.cfg.method.model_dump(mode="json"),
        "train": s.cfg.train.model_dump(mode="json"), "device": s.device.type,
        "train_examples": len(s.train_set), "val_examples": len(s.val_set),
        "dropped": dict(train_report.dropped), "steps": outcome.steps, "seconds": round(outcome.seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1), "tokens": outcome.tokens,
        "tokens_per_s": round(outcome.tokens / outcome.seconds, 1) if outcome.seconds else None,
        "final_train_loss": outcome.train_loss, "initial_eval_loss": outcome.initial_eval_loss,
        "best_eval_loss": outcome.best_eval_loss,
        "best_step": outcome.best_step, "nan_skips": outcome.nan_skips, "stopped_early": outcome.stopped_early,
        "output": str(final), "parameters": total_params, **_peak_memory(s.device),
    }  # fmt: skip
    write_summary(s.run_dir, info)
    (s.run_dir / "result.json").write_text(json.dumps(info, indent=2))
