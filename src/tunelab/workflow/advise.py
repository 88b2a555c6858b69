"""The settings ``tunelab plan`` recommends, each with a one-line reason and the evidence it
used: the quote (data size, model size, what fits where), a learning-rate range test of the
same setup when one was saved, and a finished run on the same model and data (its curve
diagnosed by the doctor). The rules of thumb are the field's (docs/plan.md cites them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.config.schema import Config, MethodConfig
from tunelab.errors import TunelabError
from tunelab.models.methods import get_method
from tunelab.train.doctor import diagnose, read_run
from tunelab.train.lr_find import lr_find_setup
from tunelab.workflow.quote import Quote, activity, estimate, target

FULL_ABOVE = 10_000  # examples: below this LoRA matches full fine-tuning (and fits anywhere)


@dataclass(frozen=True)
class Advice:
    setting: str  # dotted, as an override: method.r
    value: object
    reason: str
    evidence: str

    def to_dict(self) -> dict:
        return asdict(self)


def advise(
    quote: Quote, *, lr_find: Path | None = None, history: Path | None = None
) -> list[Advice]:
    cfg = quote.cfg
    method = _method(quote)
    out = [method]
    if not _trains_base(method.value):
        r = cfg.method.r if 8 <= cfg.method.r <= 64 else 16
        out += [
            Advice("method.r", r, "8-16 for tasks close to what the model already does, 32-64 for "
                   "tasks far from its pretraining (a new language or format)",
                   f"configured r={cfg.method.r}"),
            Advice("method.alpha", 2 * r, "alpha = 2 x rank keeps the update's scale as rank changes",
                   f"r={r}"),
        ]  # fmt: skip
    out.append(_lr(quote, method.value, lr_find))
    out.append(_epochs(quote, history))
    warmup = 0.1 if quote.total_steps < 200 else 0.05
    out.append(Advice("train.warmup_ratio", warmup,
                      "5-10 % of the steps; the larger share for short runs, whose first steps "
                      "would otherwise move on Adam's unsettled moments",
                      f"{quote.total_steps} steps planned"))  # fmt: skip
    per_epoch = quote.steps_per_epoch
    out.append(Advice("train.eval_steps", max(1, per_epoch // 10),
                      "10-20 evaluations per epoch: enough points to see over-fitting and keep the best",
                      f"{per_epoch} steps per epoch"))  # fmt: skip
    out += _batch(quote)
    replay = _replay(cfg)
    return out + ([replay] if replay else [])


def _replay(cfg: Config) -> Advice | None:
    """Self-rehearsal against forgetting, for an SFT run that replays nothing (docs/forgetting.md:
    on the example task it kept the general score while the task score held)."""
    if cfg.data.replay or cfg.stages or cfg.train.objective != "sft":
        return None
    if cfg.data.format not in ("auto", "chat", "alpaca"):
        return None
    return Advice("data.replay", "self",
                  "fine-tuning on one task costs general ability; the base model's own answers to "
                  "general prompts, replayed as a quarter of each step, keep it (data.replay_ratio "
                  "0.25; give a FILE of general data instead if you have one)",
                  "the forgetting study (docs/forgetting.md, 2026-12-01): on the example task "
                  "the forgetting check went 44.5 % -> 28.3 % without it and 44.5 % -> 44.9 % with "
                  "it, the task score 96.8 % -> 97.4 %")  # fmt: skip


def _method(quote: Quote) -> Advice:
    cfg, n, here = quote.cfg, quote.data.examples, target(quote)
    full = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "full"})})
    need = estimate(
        quote.shape, full, activity(full, quote.data, quote.here, hidden=quote.shape.hidden)
    ).peak
    fits_full = need <= here.memory_gib * 2**30
    if n < FULL_ABOVE:
        value, reason = "lora", (f"below ~{FULL_ABOVE:,} examples LoRA learns as well as full "
                                 "fine-tuning, in a fraction of the memory, and one base serves many adapters")  # fmt: skip
    elif not fits_full:
        value, reason = "lora", f"full fine-tuning does not fit {here.name}"
    else:
        value, reason = "full", "plenty of data and full fine-tuning fits: it can learn the most"
    lora = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "lora"})})
    lora_need = estimate(
        quote.shape, lora, activity(lora, quote.data, quote.here, hidden=quote.shape.hidden)
    ).peak
    if not _trains_base(value) and lora_need > here.memory_gib * 2**30 and quote.here == "cuda":
        value, reason = (
            "qlora",
            f"LoRA on a 16-bit base does not fit {here.name}; a 4-bit base does",
        )
    evidence = (f"{n:,} training examples; full fine-tuning needs ~{need / 2**30:.1f} GiB, "
                f"{here.name} has {here.memory_gib:.0f} GiB")  # fmt: skip
    return Advice("method.name", value, reason, evidence)


def _trains_base(name: str) -> bool:
    return get_method(MethodConfig(name=name)).trains_base


def _lr(quote: Quote, method: str, lr_find: Path | None) -> Advice:
    cfg = quote.cfg
    saved = _lr_find_result(cfg, lr_find)
    if saved is not None:
        path, result = saved
        return Advice("train.lr", float(f"{result['proposed']:.2g}"),
                      "the highest rate at which the loss still fell steadily in a range test "
                      "of this very setup", f"tunelab lr-find: {path}")  # fmt: skip
    size = quote.shape.params
    scale = math.sqrt(7e9 / size)  # smaller models take larger steps
    low, at_7b, high, reason = LR_RANGES[(cfg.train.objective != "sft", _trains_base(method))]
    lr = min(high, max(low, at_7b * scale))
    return Advice(
        "train.lr",
        float(f"{lr:.1g}"),
        reason,
        f"{size / 1e6:,.0f}M parameters, objective {cfg.train.objective}",
    )


#: (preference objective, base trained) -> (lowest, at 7B, highest, why)
LR_RANGES = {
    (False, False): (1e-4, 2e-4, 1e-3, "LoRA: ~2e-4 at 7B, larger for smaller models (1e-4 to 1e-3); tunelab lr-find measures it"),
    (False, True): (5e-6, 1e-5, 5e-5, "full fine-tuning: ~1e-5 at 7B, larger for smaller models (5e-6 to 5e-5)"),
    (True, False): (5e-6, 5e-6, 5e-5, "preference training with LoRA: 5e-6 to 5e-5, far below SFT's (at 5e-4 the "
                    "chosen answers lost likelihood on examples/prefer, docs/preference.md)"),
    (True, True): (5e-7, 5e-7, 5e-6, "preference training of all weights: ~5e-7 at 7B (Zephyr's DPO), up to 5e-6"),
}  # fmt: skip


def _lr_find_result(cfg: Config, path: Path | None) -> tuple[Path, dict] | None:
    path = path or Path(cfg.train.output_dir) / "lr-find" / "lr_find.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not result.get("proposed"):
        return None
    setup = result.get("setup", {})
    mine = lr_find_setup(cfg)
    same = all(setup.get(k) == mine[k] for k in ("model", "data", "objective", "method"))
    return (path, result) if same else None


def _epochs(quote: Quote, history: Path | None) -> Advice:
    n = quote.data.examples
    by_size = max(1, min(5, round(5 - 3 * math.log10(max(n, 1) / 2000))))
    reason = "about 5 epochs for ~2k examples, 2 for ~20k, 1 for large sets"
    evidence = f"{n:,} training examples"
    seen = _previous_run(quote.cfg, history)
    if seen is None:
        return Advice("train.epochs", by_size, reason, evidence)
    run, epochs, kinds, best_epoch = seen
    if "overfitting" in kinds or "memorisation" in kinds:
        value = max(0.25, round(best_epoch or epochs / 3, 2))
        why = f"a run on this data over-fitted ({', '.join(kinds)}): stop where its validation loss was lowest"
    elif "not_converged" in kinds:
        value = min(2 * epochs, 10)
        why = "a run on this data was still improving at its end: train longer"
    elif "healthy" in kinds:
        value = epochs
        why = "a run on this data converged in this many epochs; more would only risk over-fitting"
    else:
        return Advice("train.epochs", by_size, reason, evidence)
    return Advice(
        "train.epochs",
        value,
        why,
        f"{run} (doctor: {', '.join(kinds)}); by data size alone: {by_size}",
    )


def _previous_run(cfg: Config, history: Path | None):
    """(folder, epochs, doctor kinds, epoch of the best validation loss) of the newest finished
    run in the history on the same model and training data."""
    root = history or Path(cfg.train.output_dir)
    if not root.is_dir():
        return None
    results = sorted(root.glob("*/result.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in results:
        try:
            records, info = read_run(path.parent)
            saved = (path.parent / "config.yaml").read_text()
        except (TunelabError, OSError, ValueError):
            continue
        if (
            not info
            or info.get("model") != cfg.model.name
            or f"path: {cfg.data.path}\n" not in saved
        ):
            continue
        kinds = [f.kind for f in diagnose(records, info)]
        epochs = (info.get("train") or {}).get("epochs") or 1
        steps = max(info.get("steps") or 1, 1)
        best = info.get("best_step")
        best_epoch = round(epochs * best / steps, 2) if best else None
        return path.parent, epochs, kinds, best_epoch
    return None


def _batch(quote: Quote) -> list[Advice]:
    cfg, here = quote.cfg, target(quote)
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum
    out = []
    if here.max_micro_batch == 0:
        out.append(Advice("model.gradient_checkpointing", True, "not even one sequence fits without it",
                          f"{here.name}: {here.memory_gib:.0f} GiB"))  # fmt: skip
        return out
    if quote.here == "cpu" and here.fits:
        mb = t.micro_batch_size  # a CPU gains little from larger matmuls: keep what fits
        why = "fits in RAM as configured; a larger one gains little on a CPU"
    else:
        mb = min(here.max_micro_batch, global_batch)
        why = "the largest that fits (fewer, larger matmuls), accumulation keeping the global batch"
    out.append(Advice("train.micro_batch_size", mb, why,
                      f"{here.name}: up to {here.max_micro_batch} of the longest sequences fit"))  # fmt: skip
    out.append(Advice("train.grad_accum", max(1, math.ceil(global_batch / mb)),
                      f"keeps the configured global batch of {global_batch}",
                      f"micro-batch {mb}"))  # fmt: skip
    return out


def apply_advice(cfg: Config, advice: list[Advice]) -> Config:
    """``cfg`` with every recommended setting applied."""
    raw = cfg.model_dump()
    for a in advice:
        section, key = a.setting.split(".", 1)
        raw[section][key] = a.value
    return Config.model_validate(raw)
