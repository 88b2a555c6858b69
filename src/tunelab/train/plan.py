"""A run, decided before it is executed: :func:`build_plan` reads the config, the data and the
model's tokenizer (never its weights) and returns a :class:`RunPlan` — device and precision,
method and objective, the tokenized train/validation split, the step plan, the fingerprint and
whether this is a new run or a resume. Everything a user can get wrong is refused here, before
any weight is read; :mod:`tunelab.train.recipe` then executes the plan.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.checkpoint.manager import CheckpointManager, verify
from tunelab.checkpoint.sharded import is_sharded_checkpoint
from tunelab.checkpoint.state import (
    TRAINER_STATE_FILE,
    CheckpointError,
    fingerprint_diff,
    read_trainer_state,
)
from tunelab.config.load import load_config
from tunelab.config.schema import Config
from tunelab.data.pipeline import load_examples, tokenize_examples
from tunelab.data.split import split_indices
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import ConfigError, DataError, ModelError, Problem, TunelabError
from tunelab.files import file_sha256
from tunelab.models import varlen
from tunelab.models.device import Placement, choose_placement, training_attention
from tunelab.models.load import describe_config, load_model_config, model_fingerprint, resolve_model
from tunelab.models.methods import Method, get_method
from tunelab.models.shape import model_shape
from tunelab.models.tokenizer import load_tokenizer
from tunelab.train.batches import StepPlan
from tunelab.train.distributed import ONE, World, choose_distributed
from tunelab.train.objectives import Objective, get_objective
from tunelab.train.optim import warmup_steps
from tunelab.train.replay import check_replay, plan_replay, replay_per_step
from tunelab.train.speed import (
    choose_compile,
    choose_packing,
    compile_key,
    layer_graphs,
    pad_multiple,
)
from tunelab.train.stages import StagedSteps, check_stages, staged_steps

#: Settings that may change when resuming (extending a run, evaluating more often...).
RESUMABLE_CHANGES = {"epochs", "max_steps", "eval_steps", "save_steps", "keep_last", "keep", "early_stopping_patience",
                     "eval_at_start", "output_dir", "eval_batch_size", "max_nan_skips", "doctor",
                     "compile", "packing", "micro_batch_tokens", "distributed", "distributed_timeout_s"}  # fmt: skip
#: Data settings of other commands (data split, data check): they never change a training run.
NOT_TRAINING_DATA = {"path", "val_path", "split_ratios", "diversity_threshold"}


class ResumeError(TunelabError):
    pass


@dataclass
class RunPlan:
    cfg: Config
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from; None: a new run
    placement: Placement
    model_config: dict  # the model's config.json: architecture and sizes
    method: Method
    objective: Objective
    tokenizer: object
    train: list[TokenizedExample]
    val: list[TokenizedExample]  # weights: 1 on reply tokens, 0 elsewhere
    dropped: dict[str, int]  # training examples dropped by the truncation policy, by reason
    truncated: int  # training examples shortened by the truncation policy
    steps: StepPlan
    total_steps: int
    eval_steps: int
    save_steps: int
    warmup_steps: int
    keep: str  # best | last: which weights final/ holds
    fingerprint: dict
    notes: list[str] = field(default_factory=list)  # resume decisions worth telling the user
    objective_notes: list[str] = field(default_factory=list)  # what the objective decided
    attention: str = "sdpa"  # the attention implementation trained with (models/device.py)
    compile: tuple[bool, str] = (False, "")  # compile the decoder layers?, why (train.compile)
    compile_key: str | None = None  # the compiled layer graph's name (train/speed.py)
    packing: tuple[bool, str] = (False, "")  # one row per micro-batch?, why (train.packing)
    world: World = ONE  # this process's rank among the job's (train/distributed.py)
    distributed: tuple[str, str] = ("none", "")  # none | ddp | fsdp, why (train.distributed)
    replay: str = ""  # what the replay pool is (data.replay; train/replay.py), "" without
    rehearsal: list[str] = field(default_factory=list)  # data.replay=self: the prompts to answer

    @property
    def fresh(self) -> bool:
        return self.resume_from is None

    @property
    def sharded(self) -> bool:
        """FSDP: each rank holds a shard of the decoder layers (train/distributed.py)."""
        return self.distributed[0] == "fsdp"

    def truncation(self) -> str:
        """What data.truncation did to the training examples, in words ("" when nothing)."""
        limit, policy = self.cfg.data.max_seq_len, self.cfg.data.truncation
        parts = (
            [f"{self.truncated} truncated to {limit} tokens (data.truncation={policy})"]
            if self.truncated
            else []
        )
        parts += [f"{n} dropped: {reason}" for reason, n in sorted(self.dropped.items()) if n]
        return "; ".join(parts)

    def autocast(self, model):
        """The context every forward of ``model`` runs in: autocast at the placement's half
        precision (none in fp32), with what the method needs under it."""
        import torch

        dtype = self.placement.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.placement.device.type, dtype=dtype))
        stack.enter_context(self.method.under_autocast(model))
        return stack

    def flops_per_token(self) -> float | None:
        """Training FLOPs per real token of this run (PERFORMANCE.md's arithmetic); None for a
        model family tunelab cannot size."""
        try:
            shape = model_shape(self.model_config)
        except ModelError:
            return None
        lengths, weighted = sequence_stats(self.train)
        method = self.method
        return shape.train_flops_per_token(
            trains_base=method.trains_base,
            adapter=0 if method.trains_base else method.trainable_params(shape),
            s_eff=sum(x * x for x in lengths) / sum(lengths), head_share=weighted,
            recompute=self.cfg.model.gradient_checkpointing,
            reference=live_reference(self.cfg, method, self.objective),
        )  # fmt: skip

    def run_flops(self) -> float | None:
        """The training FLOPs of the whole run (what train.compile auto weighs); None for a
        model family tunelab cannot size."""
        per_token, t = self.flops_per_token(), self.cfg.train
        per_step = (
            statistics.mean(len(x.seq) for x in self.train) * t.micro_batch_size * t.grad_accum
        )
        return None if per_token is None else per_token * per_step * self.total_steps

    @property
    def train_tokens(self) -> int:
        """Tokens of the training sequences (a pair's rejected answer included)."""
        return sum(
            len(t.seq) + (len(t.rejected) if t.rejected is not None else 0) for t in self.train
        )

    def describe(self) -> str:
        """The plan as a person reads it (``tunelab train --dry-run``)."""
        c, t = self.cfg, self.cfg.train
        start = ("new run" if self.fresh
                 else f"resume from {self.resume_from.name} (fingerprint matches)")  # fmt: skip
        lengths = sorted(len(x.seq) for x in self.train)
        rows = [
            ("run folder", f"{self.run_dir} ({start})"),
            ("model", f"{c.model.name} ({describe_config(self.model_config)})"),
            ("device", f"{self.placement.describe()}: weights in "
                       f"{str(self.placement.weight_dtype(self.method.trains_base)).removeprefix('torch.')}, "
                       f"compute in {str(self.placement.autocast_dtype or 'torch.float32').removeprefix('torch.')}"),
            ("method", self.method.describe()),
            ("objective", self.objective.name + _objective_settings(c)),
            ("data", f"{len(self.train)} train / {len(self.val)} validation examples"
                     + (f" ({self.truncation()})" if self.truncation() else "")),
            ("tokens", f"{self.train_tokens:,} train (median {lengths[len(lengths) // 2]}, max "
                       f"{lengths[-1]}, limit {c.data.max_seq_len}), "
                       f"{sum(len(x.seq) for x in self.val):,} validation"),
            ("batching", f"{t.micro_batch_size} x {t.grad_accum} accumulation = "
                         f"{t.micro_batch_size * t.grad_accum} {_unit(self)} per step"
                         + (f", run in forwards of up to {self.steps.max_tokens} padded tokens"
                            if getattr(self.steps, "max_tokens", None) else "")
                         + (f"; {self.packing[1]}" if self.packing[1] else "")
                         + (f"; widths padded to a multiple of {self.objective.pad_to} (bf16 on a "
                            "CPU: fewer kernel shapes)" if self.objective.pad_to else "")),
            ("compile", self.compile[1] or "off (train.compile=off)"),
            ("steps", f"{self.steps.steps_per_epoch} per epoch, {self.total_steps} in all, "
                      f"warmup {self.warmup_steps}, {t.schedule} to {t.min_lr_ratio:g} x lr {t.lr:g}"),
            ("evaluation", f"every {self.eval_steps} steps" if self.val else "none (no validation data)"),
            ("replay", self.replay or "none"),
            *([("stages", self.steps.describe())] if self.cfg.stages else []),
            ("processes", f"{self.distributed[1]}; memory per process: tunelab plan --nproc "
                          f"{self.world.size}" if self.world.several else self.distributed[1] or "one"),
            ("checkpoints", f"every {self.save_steps} steps, last {t.keep_last} kept"),
            ("final weights", self.keep),
            ("fingerprint", ", ".join(f"{k}={v}" for k, v in self.fingerprint.items()
                                      if k in ("model", "data.path", "data.val_path"))),
        ]  # fmt: skip
        if self.objective.uses_reference:
            rows.append(("reference", describe_reference(self)))
        rows += [("objective", note) for note in self.objective_notes]
        rows += [("resume", note) for note in self.notes]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _packing(setting: str, placement, objective, steps, model_config: dict, method):
    """(``train.packing``'s decision and why, whether packed rows run by document, the multiple
    batch widths are padded to) on the placement's device."""
    device = placement.device.type
    by_document = varlen.by_document(placement.device, placement.compute_dtype)
    pad_to = pad_multiple(device, placement.precision)
    decision = choose_packing(setting, objective, steps, model_config, method.trains_base,
                              by_document, pad_to, device)  # fmt: skip
    return decision, by_document, pad_to


def _attention(cfg: Config, placement, by_document: bool, packed: bool, seqs: list,
               budget: int | None) -> str:  # fmt: skip
    """The attention implementation to train with: the varlen one for packed rows with a
    kernel, else the device's choice for the widest row (models/device.py). ``budget``: the
    step plan's token budget, if any."""
    if by_document:
        return varlen.NAME
    t, lengths = cfg.train, sequence_stats(seqs)[0]
    longest = max(lengths)
    if packed:  # a packed row: the micro-batch's sequences end to end
        longest = max(longest, budget or sum(sorted(lengths)[-t.micro_batch_size :]))
    return training_attention(placement.device.type, longest)


def sequence_stats(train: list[TokenizedExample]) -> tuple[list[int], float]:
    """(the length of every training sequence — a pair's rejected answer too —, the share of
    their targets that carry loss weight): what FLOPs and memory are sized by."""
    seqs = [t.seq for t in train] + [t.rejected for t in train if t.rejected is not None]
    lengths = [len(s) for s in seqs]
    weighted = sum(int((s.weights[1:] > 0).sum()) for s in seqs) / max(sum(lengths) - len(seqs), 1)
    return lengths, weighted


def build_plan(cfg: Config, *, resume: Path | None = None, read_weights: bool = True,
               world: World = ONE) -> RunPlan:  # fmt: skip
    """Decide the run ``cfg`` describes (``resume``: a run folder to continue). Reads the data
    and the tokenizer, never the model's weights — except, with ``read_weights``, to hash them
    for the fingerprint (a resume always does, to compare)."""
    check_files(cfg)
    placement = choose_placement(cfg.model)
    method = get_method(cfg.method)
    method.check(placement)
    distributed = choose_distributed(cfg.train.distributed, world, method)
    objective = get_objective(cfg)
    check_replay(cfg, objective)
    # one folder for all ranks: rank 0 names it (a name with the time could differ by a second)
    run_dir = world.share(run_folder(cfg, resume) if world.main or not world.joined else None)
    examples = load_examples(training_data(cfg), cfg.data)
    val_examples = load_examples(cfg.data.val_path, cfg.data) if cfg.data.val_path else None
    objective.check_data(examples + (val_examples or []))
    model_config = load_model_config(cfg.model.name)
    if cfg.model.precision == "auto":  # on a CPU, bf16 where it pays for this model's width
        text = model_config.get("text_config") or model_config
        placement = choose_placement(cfg.model, train_hidden=text.get("hidden_size"))
        placement = world.share(placement)  # rank 0's: a timing could tip ranks apart
    tokenizer = load_tokenizer(cfg.model.tokenizer or resolve_model(cfg.model.name))
    train, val, dropped, truncated = datasets(cfg, tokenizer, examples, val_examples)
    objective_notes = objective.prepare(train, val, cfg)
    t = cfg.train
    steps = step_plan(cfg, objective, train, tokenizer)
    total = steps.total_steps(t.epochs, t.max_steps)
    replay, rehearsal = plan_replay(cfg, tokenizer, train, steps, total)
    eval_steps = t.eval_steps or max(1, steps.steps_per_epoch // 10)
    packing, by_document, pad_to = _packing(t.packing, placement, objective, steps,
                                            model_config, method)  # fmt: skip
    # every check is done: only now are the weights hashed (to fingerprint the run)
    fingerprint = run_fingerprint(cfg, read_weights=read_weights or resume is not None)
    checkpoint, notes = resume_point(run_dir, fingerprint) if resume is not None else (None, [])
    check_format(checkpoint, distributed[0])
    if objective.can_pack:
        objective.pack = packing[0]
    objective.pad_to = pad_to
    attention = _attention(cfg, placement, packing[0] and by_document, packing[0], train + val,
                           getattr(steps, "max_tokens", None))  # fmt: skip
    device = placement.device.type
    key = compile_key(model_config, cfg.method.model_dump(), placement.precision, device, attention)
    plan = RunPlan(
        cfg=cfg, run_dir=run_dir, resume_from=checkpoint, placement=placement,
        model_config=model_config, method=method,
        objective=objective, tokenizer=tokenizer, train=train, val=val, dropped=dropped,
        truncated=truncated,
        steps=steps, total_steps=total, eval_steps=eval_steps, save_steps=t.save_steps or eval_steps,
        warmup_steps=warmup_steps(t, total), keep=_keep(cfg, val), fingerprint=fingerprint,
        notes=notes, objective_notes=objective_notes,
        attention=attention, compile_key=key,
        packing=packing, world=world, distributed=distributed, replay=replay,
        rehearsal=rehearsal,
    )  # fmt: skip
    plan.compile = choose_compile(t.compile, plan.run_flops(), device, key, layer_graphs(attention))
    return plan


def step_plan(cfg: Config, objective, train: list, tokenizer) -> StepPlan | StagedSteps:
    """Which examples make each optimizer step (train/batches.py; in stages, train/stages.py)."""
    t = cfg.train
    if cfg.stages:
        return staged_steps(cfg, tokenizer, train)
    budget = t.micro_batch_tokens
    if budget and not objective.can_pack:
        if budget != "auto":
            raise ConfigError(f"train.micro_batch_tokens works with train.objective=sft only "
                              f"({objective.name} batches pairs); remove it")  # fmt: skip
        budget = None  # auto: where it applies
    return StepPlan([len(x.seq) for x in train], micro_batch_size=t.micro_batch_size,
                    grad_accum=t.grad_accum, seed=t.seed, max_tokens=budget,
                    replay_per_step=replay_per_step(cfg))  # fmt: skip


def load_resume_config(run_dir: Path, overrides: list[str]) -> Config:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ResumeError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    return load_config(saved, overrides)


def run_folder(cfg: Config, resume: Path | None) -> Path:
    if resume is not None:
        return resume
    name = (
        cfg.name
        or f"{Path(training_data(cfg)).stem}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = Path(cfg.train.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"name: run folder {run_dir} already exists (choose another name, or --resume {run_dir})"
        )
    return run_dir


def run_fingerprint(cfg: Config, *, read_weights: bool = True) -> dict:
    """What a checkpoint must agree with to be resumed: model, data, and the settings that shape
    the optimisation (not the ones that only extend or observe it)."""
    fp = {
        "model": model_fingerprint(cfg.model.name, read_weights=read_weights),
        "data.path": file_sha256(training_data(cfg))[:16],
    }
    for i, stage in enumerate(cfg.stages):
        fp[f"stages.{i}"] = stage.model_dump(mode="json") | {"data": file_sha256(stage.data)[:16]}
    if cfg.data.val_path:
        fp["data.val_path"] = file_sha256(cfg.data.val_path)[:16]
    if cfg.data.replay and cfg.data.replay != "self":
        fp["data.replay_file"] = file_sha256(cfg.data.replay)[:16]
    for section in ("method", "data"):
        for k, v in getattr(cfg, section).model_dump(mode="json").items():
            if k not in NOT_TRAINING_DATA:
                fp[f"{section}.{k}"] = v
    for k, v in cfg.train.model_dump(mode="json").items():
        if k not in RESUMABLE_CHANGES:
            fp[f"train.{k}"] = v
    return fp


def resume_point(run_dir: Path, fingerprint: dict) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume from, what was decided on the way).

    The newest checkpoint whose files match their manifest is used; damaged ones are named
    and skipped. A run that died before its first checkpoint has nothing to lose: it starts
    from step 0 (None). A fingerprint that differs, or checkpoints that are all damaged, are
    refused — never a silent fresh start."""
    manager = CheckpointManager(run_dir)
    candidates = manager.newest_first()
    if not candidates:
        return None, [f"{run_dir} has no checkpoint yet (the run stopped before its first): "
                      "starting it from step 0"]  # fmt: skip
    notes = []
    for checkpoint in candidates:
        problem = verify(checkpoint)
        if problem is None:
            try:
                saved = read_trainer_state(checkpoint / TRAINER_STATE_FILE)
            except CheckpointError as e:
                problem = str(e)
        if problem is not None:
            notes.append(f"{checkpoint.name} is damaged: {problem}")
            continue
        diff = fingerprint_diff(saved.get("fingerprint", {}), fingerprint)
        if diff:
            raise ResumeError(
                f"cannot resume {run_dir}: it was trained with other settings:\n  "
                + "\n  ".join(diff)
            )
        if notes:
            notes.append(f"resuming from {checkpoint.name}, the newest checkpoint that is intact")
        return checkpoint, notes
    raise ResumeError(
        f"{run_dir}: no intact checkpoint to resume from (refusing to start afresh):\n  "
        + "\n  ".join(notes)
        + f"\nTo start over, train into a new folder (name=...) or delete {run_dir}."
    )


def check_format(checkpoint: Path | None, distributed: str) -> None:
    """A sharded checkpoint (FSDP's) resumes on any number of processes, sharded or not; a
    whole one (one process, ddp) does not go into a sharded model: refused, with the way out."""
    if checkpoint is not None and distributed == "fsdp" and not is_sharded_checkpoint(checkpoint):
        raise ResumeError(
            f"{checkpoint}: written by one process or under ddp (whole weights in trained/), and "
            "train.distributed=fsdp resumes only sharded checkpoints; resume it with "
            "train.distributed=ddp (every process holds the model), or on one process"
        )


def training_data(cfg: Config) -> str | None:
    """The file of the examples the run ends on: data.path, or the last stage's data."""
    return cfg.stages[-1].data if cfg.stages else cfg.data.path


def check_files(cfg: Config) -> None:
    check_stages(cfg)
    if not training_data(cfg):
        raise ConfigError("data.path: missing (the training data file)")
    for key in ("path", "val_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            raise DataError(Problem(str(value), None, None, f"data.{key}: file not found"))


def datasets(cfg: Config, tokenizer, examples, val_examples):
    if cfg.data.val_path:
        train_ex, val_ex = examples, val_examples
    elif cfg.data.val_ratio > 0:
        idx = split_indices(examples, [1 - cfg.data.val_ratio, cfg.data.val_ratio], cfg.data.seed)
        train_ex, val_ex = [examples[i] for i in idx[0]], [examples[i] for i in idx[1]]
    else:
        train_ex, val_ex = examples, []
    report = tokenize_examples(train_ex, tokenizer, cfg.data)
    val_cfg = cfg.data.model_copy(update={"prompt_loss_weight": 0.0})
    val = tokenize_examples(val_ex, tokenizer, val_cfg).examples if val_ex else []
    if len(report.examples) < cfg.train.micro_batch_size:
        raise DataError(
            Problem(training_data(cfg), None, None,
                    f"{len(report.examples)} usable training examples, fewer than one micro-batch "
                    f"(train.micro_batch_size={cfg.train.micro_batch_size})")
        )  # fmt: skip
    return report.examples, val, dict(report.dropped), report.truncated


REFERENCE_FILE = "reference_logps.json"  # precomputed reference log-probabilities


def precomputes(cfg: Config, method) -> bool:
    """Whether the reference's values are computed once before training (``precompute_ref``)."""
    setting = cfg.train.preference.precompute_ref
    return setting is True or (setting == "auto" and method.trains_base)


def live_reference(cfg: Config, method, objective) -> bool:
    """Whether every training step also scores a reference model (not precomputed): a forward
    more to count in the step's FLOPs."""
    return objective.uses_reference and not precomputes(cfg, method)


def describe_reference(plan: RunPlan) -> str:
    if not plan.objective.uses_reference:
        return "none (the objective needs none)"
    if precomputes(plan.cfg, plan.method):
        return f"precomputed once before training, cached in {REFERENCE_FILE}"
    if plan.method.trains_base:
        return "a frozen copy of the model (precompute_ref=false: twice the weights in memory)"
    return "the model it starts from, with the adapter disabled (no second copy)"


def _unit(plan: RunPlan) -> str:
    """What one element of a micro-batch is: a sequence, or a pair of them."""
    pairs = any(t.rejected is not None for t in plan.train[:1])
    return "pairs (chosen and rejected: twice the sequences)" if pairs else "sequences"


#: The train.preference settings each objective reads (shown by --dry-run).
OBJECTIVE_SETTINGS = {
    "dpo": ("beta", "dpo_loss", "label_smoothing", "precompute_ref"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "precompute_ref"),
    "simpo": ("beta", "simpo_gamma", "label_smoothing"),
    "orpo": ("orpo_lambda",),
}


def _objective_settings(cfg: Config) -> str:
    keys = OBJECTIVE_SETTINGS.get(cfg.train.objective, ())
    p = cfg.train.preference
    shown = [f"{k}={getattr(p, k)}" for k in keys if getattr(p, k) is not None]
    return f" ({', '.join(shown)})" if shown else ""


def _keep(cfg: Config, val: list) -> str:
    keep = cfg.train.keep
    if keep == "best" and not val:
        raise ConfigError(
            "train.keep: 'best' needs validation data to choose by (set data.val_path or "
            "data.val_ratio > 0), or use train.keep=last"
        )
    return keep or ("best" if val else "last")
