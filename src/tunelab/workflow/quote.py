"""``tunelab plan``: the quote before a run — memory broken down and fitted against devices,
steps, time and cost — from the config, the data's real token counts and the model's
``config.json`` alone. No weight is read; a model folder with only its config.json will do.

Memory comes from :mod:`tunelab.models.memory`, FLOPs from :mod:`tunelab.models.shape`; time
divides FLOPs by a throughput calibrated from the newest finished run on the same kind of
device in the run history (``train.output_dir``), or by a stated assumption
(``plan.mfu``, ``plan.cpu_gflops_per_core``). Recommendations: :mod:`tunelab.workflow.advise`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tunelab.config.schema import Config
from tunelab.data.pipeline import load_examples
from tunelab.errors import ConfigError, ModelError
from tunelab.files import atomic_write_json, file_sha256
from tunelab.models import catalog, varlen
from tunelab.models.device import (
    cpu_training_precision,
    cuda_available,
    device_name,
    training_attention,
)
from tunelab.models.load import WEIGHT_SUFFIXES, load_model_config, resolve_model
from tunelab.models.memory import GIB, Activity, Memory, estimate_memory, rule_of_thumb
from tunelab.models.methods import get_method
from tunelab.models.shape import ModelShape, model_shape
from tunelab.models.tokenizer import load_tokenizer
from tunelab.train.batches import StepPlan
from tunelab.train.objectives import get_objective
from tunelab.train.plan import check_files, datasets, live_reference, sequence_stats
from tunelab.train.speed import choose_compile, compile_key, layer_graphs

#: card -> (memory in GB, dense bf16 peak in TFLOP/s; the T4's is fp16, it has no bf16)
CARDS = {"T4-16GB": (16, 65), "L4-24GB": (24, 121), "A100-40GB": (40, 312),
         "L40S-48GB": (48, 362), "H100-80GB": (80, 989), "GH200-96GB": (96, 989),
         "H200-141GB": (141, 989)}  # fmt: skip
FEW_STEPS, MANY_STEPS = 50, 100_000
CHARS_PER_TOKEN = 4  # the length estimate when the model folder has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class DataShape:
    examples: int
    tokens: int  # training tokens per epoch (a pair's two sequences both)
    median_len: int
    max_len: int
    worst_batch: tuple[int, int]  # (sequences, padded length) of the largest micro-batch
    weighted_share: float  # share of targets with loss weight > 0 (the LM head computes those)
    s_eff: float  # sum l^2 / sum l: the attention FLOPs' sequence length
    pairs: bool
    estimated: str | None = None  # why lengths are estimated from characters, if they are


@dataclass
class Device:
    name: str
    memory_gib: float
    fits: bool
    max_micro_batch: int  # 0: not even one sequence fits
    grad_accum: int  # keeps the requested global batch at that micro-batch
    hours: float | None = None
    cost: float | None = None
    mfu: float | None = None  # cards: the MFU the time assumes
    mfu_source: str = ""  # "assumed", or the run it was measured on


@dataclass
class Quote:
    cfg: Config
    shape: ModelShape
    data: DataShape
    memory: Memory
    rule_of_thumb: int
    steps_per_epoch: int
    total_steps: int
    flops_per_token: float
    throughput: float  # FLOP/s this machine is expected to train at
    throughput_source: str
    seconds: float | None  # on this machine (None: the method cannot run here)
    devices: list[Device]
    savings: list[tuple[str, int]]  # (change, peak after it) when the configured run does not fit
    api_costs: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    here: str = "cpu"  # the device the breakdown is for: this machine's, or CUDA for QLoRA
    runs_here: bool = True  # False: the method needs a CUDA GPU this machine lacks
    compile: tuple[bool, str] = (False, "")  # train.compile's decision here (train/speed.py)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("cfg", "shape", "memory")}
        out["model"] = dict(name=self.cfg.model.name, family=self.shape.family,
                            params=self.shape.params, layers=self.shape.layers,
                            hidden=self.shape.hidden, vocab=self.shape.vocab)  # fmt: skip
        out["memory"] = self.memory.as_dict()
        return out


def make_quote(cfg: Config, *, history: Path | None = None) -> Quote:
    """The quote for ``cfg`` (``history``: the run folders to calibrate from; default
    ``train.output_dir``). Every check of ``tunelab train`` on the data and the model's config
    runs first; the device and method are *not* required to exist here (QLoRA can be quoted on
    a machine without CUDA)."""
    check_files(cfg)
    objective = get_objective(cfg)
    model_config = load_model_config(cfg.model.name, need_weights=False)
    shape = model_shape(model_config, where=f"model.name {cfg.model.name}")
    method = get_method(cfg.method)
    method.check_shape(shape)
    if cfg.stages:
        raise ConfigError("tunelab plan does not quote a run in stages yet; quote each stage's "
                          "data as data.path")  # fmt: skip
    examples = load_examples(cfg.data.path, cfg.data)
    objective.check_data(examples)
    data = _cached_data_shape(cfg, examples)
    t = cfg.train
    steps = StepPlan([1] * data.examples, micro_batch_size=t.micro_batch_size,
                     grad_accum=t.grad_accum, seed=t.seed)  # fmt: skip
    total = steps.total_steps(t.epochs, t.max_steps)
    machine = _here()
    runs_here = method.quantize_bits is None or machine == "cuda"
    here = machine if runs_here else "cuda"
    memory = estimate(shape, cfg, activity(cfg, data, here, hidden=shape.hidden))
    fpt = shape.train_flops_per_token(
        trains_base=method.trains_base, adapter=memory.trainable,
        s_eff=data.s_eff, head_share=data.weighted_share, recompute=cfg.model.gradient_checkpointing,
        reference=live_reference(cfg, method, objective),
    )  # fmt: skip
    tokens = data.tokens * total / max(steps.steps_per_epoch, 1)
    history = history or Path(cfg.train.output_dir)
    throughput, source = calibrate(cfg, machine, history)
    quote = Quote(
        cfg=cfg, shape=shape, data=data, memory=memory, rule_of_thumb=rule_of_thumb(shape, "bf16"),
        steps_per_epoch=steps.steps_per_epoch, total_steps=total, flops_per_token=fpt,
        throughput=throughput, throughput_source=source,
        seconds=tokens * fpt / throughput if runs_here else None,
        devices=[], savings=[], here=here, runs_here=runs_here,
        api_costs={k: v * tokens / 1000 for k, v in cfg.plan.api_prices.items()},
    )  # fmt: skip
    quote.devices = fit_devices(quote, tokens * fpt, history)
    if runs_here:
        quote.compile = compile_decision(cfg, model_config, shape, data, here, tokens * fpt)
    quote.warnings = _warnings(quote)
    if runs_here and not quote.devices[0].fits:
        quote.savings = savings(quote)
    return quote


def compile_decision(
    cfg: Config, model_config: dict, shape: ModelShape, data: DataShape, device: str, flops: float
) -> tuple[bool, str]:
    """What ``train.compile`` would decide for this run here — the rule and the layer graph's
    name that ``tunelab train`` uses (train/speed.py), from the quote's FLOPs. A CPU runs
    ``packing: on`` by document (models/varlen.py), a graph of its own; whether ``auto`` packs,
    or a GPU has the varlen kernel, needs the step plan or torch, which the quote does without."""
    attention = training_attention(device, data.max_len)
    if cfg.train.packing == "on" and device == "cpu":
        attention = varlen.NAME
    precision = training_precision(cfg, device, shape.hidden)
    key = compile_key(model_config, cfg.method.model_dump(), precision, device, attention)
    return choose_compile(cfg.train.compile, flops, device, key, layer_graphs(attention))


def training_precision(cfg: Config, device: str, hidden: int) -> str:
    """The precision a run of ``cfg`` trains in on ``device`` (``auto`` resolved)."""
    if cfg.model.precision != "auto":
        return cfg.model.precision
    return "bf16" if device == "cuda" else cpu_training_precision(hidden)[0]


def estimate(shape: ModelShape, cfg: Config, act: Activity) -> Memory:
    return estimate_memory(shape, get_method(cfg.method), act)


def activity(
    cfg: Config, data: DataShape, device: str, micro_batch: int | None = None, *, hidden: int
) -> Activity:
    """The step's activity at the configured (or another) micro-batch on ``device`` (a model
    ``hidden`` wide: on this machine's CPU, ``auto`` precision is what training would choose)."""
    seqs, length = data.worst_batch
    if micro_batch is not None:
        seqs, length = micro_batch * (2 if data.pairs else 1), data.max_len
    precision = training_precision(cfg, device, hidden)
    reference = (get_objective(cfg).uses_reference and get_method(cfg.method).trains_base
                 and cfg.train.preference.precompute_ref is False)  # fmt: skip
    return Activity(
        micro_batch=seqs, seq_len=length,
        weighted_tokens=max(1, round(seqs * (length - 1) * data.weighted_share)),
        precision=precision, device=device,
        gradient_checkpointing=cfg.model.gradient_checkpointing, reference_copy=reference,
        matmul_attention=training_attention(device, data.max_len) != "sdpa",
    )  # fmt: skip


def _cached_data_shape(cfg: Config, examples) -> DataShape:
    """:func:`_data_shape`, kept in ``$TUNELAB_HOME/plan-cache/`` under a key of everything it
    reads — the data file's and the tokenizer folder's bytes, the data settings, the micro-batch
    size and seed, tunelab's code and the tokenizer libraries' versions — so a second ``tunelab
    plan`` of the same data (the usual loop: plan, change a setting, plan again) neither imports
    transformers nor tokenizes (~1 s). A damaged entry is recomputed."""
    source = cfg.model.tokenizer or resolve_model(cfg.model.name)
    key = _shape_key(cfg, source)
    path = catalog.home() / "plan-cache" / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            return DataShape(**{**fields, "worst_batch": tuple(fields["worst_batch"])})
        except (OSError, ValueError, TypeError, KeyError):
            pass
    data = _data_shape(cfg, examples, source)
    if path is not None and data.estimated is None:
        with contextlib.suppress(OSError):  # a read-only home: no cache, same answer
            atomic_write_json(path, asdict(data))
    return data


def _shape_key(cfg: Config, source: Path | str) -> str | None:
    """None when the tokenizer is not a local folder (a hub id, a .gguf file): not cached."""
    if isinstance(source, str):  # model.tokenizer as written: a catalog name or a path
        source = resolve_model(source) if source in catalog.CATALOG else Path(source).expanduser()
    if not (isinstance(source, Path) and source.is_dir()):
        return None
    package = Path(__file__).parents[1]
    parts = {
        "data": cfg.data.model_dump(mode="json"),
        "train": [
            cfg.train.micro_batch_size,
            cfg.train.grad_accum,
            cfg.train.micro_batch_tokens,
            cfg.train.seed,
            cfg.train.objective,
        ],
        "data_file": file_sha256(cfg.data.path),
        "tokenizer": {
            f.name: file_sha256(f)
            for f in sorted(source.iterdir())
            if f.is_file() and f.suffix not in (*WEIGHT_SUFFIXES, ".gguf")
        },  # fmt: skip
        "code": [
            (str(f.relative_to(package)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(package.rglob("*.py"))
        ],  # fmt: skip
        "libraries": [_version(name) for name in ("transformers", "tokenizers")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _data_shape(cfg: Config, examples, source: Path | str) -> DataShape:
    """Token counts of the training split, from the model's tokenizer (or from characters when
    the model folder has none, said so)."""
    estimated = None
    try:
        if isinstance(source, Path) and not any((source / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{source}: no tokenizer files")  # a config-only folder
        tokenizer = load_tokenizer(source)
    except ModelError as e:
        tokenizer = None
        estimated = f"no tokenizer ({e}): lengths estimated at {CHARS_PER_TOKEN} characters a token"
    if tokenizer is not None:
        train, _, _, _ = datasets(cfg, tokenizer, examples, None)
        lengths, weighted = sequence_stats(train)
        pairs = any(t.rejected is not None for t in train)
        rows = [max(len(t.seq), len(t.rejected) if t.rejected is not None else 0) for t in train]
    else:
        lengths = [min(cfg.data.max_seq_len, 8 + len(repr(e)) // CHARS_PER_TOKEN)
                   for e in examples]  # fmt: skip
        weighted, pairs, rows = 1.0 if cfg.data.prompt_loss_weight > 0 else 0.5, False, lengths
    per_row = 2 if pairs else 1  # a pair is two sequences padded to the longer
    t = cfg.train
    budget = t.micro_batch_tokens if get_objective(cfg).can_pack else None  # as train/plan.py
    steps = StepPlan(rows, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                     seed=t.seed, max_tokens=budget)  # fmt: skip
    # the most padded tokens; of those the widest (matmul attention grows with rows x width²)
    worst = max((len(mb) * max(rows[i] for i in mb), max(rows[i] for i in mb), len(mb))
                for step in steps.epoch(0) for mb in step)  # fmt: skip
    return DataShape(
        examples=len(rows), tokens=sum(lengths), median_len=int(statistics.median(lengths)),
        max_len=max(lengths), worst_batch=(worst[2] * per_row, worst[1]),
        weighted_share=round(weighted, 4), s_eff=sum(x * x for x in lengths) / sum(lengths),
        pairs=pairs, estimated=estimated,
    )  # fmt: skip


def target(quote: Quote) -> Device:
    """The device the advice is for: this machine when the method runs here, else the
    smallest card it fits (the largest when it fits none)."""
    if quote.runs_here:
        return quote.devices[0]
    return next((d for d in quote.devices[1:] if d.fits), quote.devices[-1])


def _here() -> str:
    return "cuda" if cuda_available() else "cpu"


def measured_runs(history: Path) -> list[tuple[Path, str, float, str]]:
    """(run folder, device recorded, achieved training FLOP/s, how) of every finished run in
    ``history`` that recorded its throughput and FLOPs per token, newest first."""
    if not history.is_dir():
        return []
    out = []
    for path in sorted(
        history.glob("*/result.json"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        try:
            info = json.loads(path.read_text())
            device = info.get("device_name") or info.get("device")
            rate, fpt = info.get("tokens_per_s"), info.get("train_flops_per_token")
        except (OSError, ValueError, AttributeError):
            continue
        if device and rate and fpt:
            out.append((path.parent, str(device), rate * fpt,
                        f"{rate:,.0f} tokens/s x {fpt / 1e9:.2f} GFLOP/token"))  # fmt: skip
    return out


def calibrate(cfg: Config, kind: str, history: Path) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): the newest finished run in ``history`` on this
    device that recorded its throughput; else the stated assumption."""
    here = device_name(kind)
    for run, device, flops, how in measured_runs(history):
        if device == here:
            return flops, f"calibrated from run {run} ({how})"
    if kind == "cuda":
        peak = _card_peak(here) or 312
        return peak * 1e12 * cfg.plan.mfu, (f"assumed {cfg.plan.mfu:.0%} MFU of {peak} TFLOP/s "
                                            "(no run on this GPU in the history yet)")  # fmt: skip
    cores = os.cpu_count() or 1
    return cfg.plan.cpu_gflops_per_core * 1e9 * cores, (
        f"assumed {cfg.plan.cpu_gflops_per_core:g} GFLOP/s per core x {cores} "
        "(no CPU run in the history yet; the first run calibrates it)")  # fmt: skip


def _card_peak(name: str) -> int | None:
    for card, (_, peak) in CARDS.items():
        if card.split("-")[0] in name:
            return peak
    return None


def max_micro_batch(cfg: Config, quote: Quote, kind: str, capacity: float, limit: int = 256) -> int:
    """The largest micro-batch (of the longest sequences) whose peak fits ``capacity`` bytes."""
    best = 0
    b = 1
    while b <= limit:
        need = estimate(
            quote.shape, cfg, activity(cfg, quote.data, kind, b, hidden=quote.shape.hidden)
        ).peak
        if need > capacity:
            break
        best, b = b, b * 2
    return best


def card_mfu(cfg: Config, card: str, history: Path) -> tuple[float, str]:
    """The MFU a card is quoted at: the newest run on that kind of card in the history, else
    ``plan.mfu``."""
    peak = CARDS[card][1]
    for run, device, flops, _ in measured_runs(history):
        if device.startswith("cuda:") and card.split("-")[0] in device:
            return flops / (peak * 1e12), f"measured on run {run}"
    return cfg.plan.mfu, "assumed"


def fit_devices(quote: Quote, flops: float, history: Path) -> list[Device]:
    """This machine first (its GPU, else its RAM), then the common cards."""
    cfg, out = quote.cfg, []
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum
    rows = []
    if not quote.runs_here:
        out.append(Device(name=f"this machine: {cfg.method.name} needs a CUDA GPU",
                          memory_gib=round(ram_bytes() / GIB, 1), fits=False, max_micro_batch=0, grad_accum=0))  # fmt: skip
    elif quote.here == "cuda":
        import torch

        rows.append(
            ("this machine (GPU)", torch.cuda.get_device_properties(0).total_memory, "cuda", None)
        )
    else:
        rows.append(("this machine (RAM)", ram_bytes(), "cpu", None))
    rows += [(card, gb * 1e9, "cuda", peak) for card, (gb, peak) in CARDS.items()]
    for name, capacity, kind, peak in rows:
        q = replace(
            quote,
            memory=estimate(
                quote.shape, cfg, activity(cfg, quote.data, kind, hidden=quote.shape.hidden)
            ),
        )
        mb = max_micro_batch(cfg, q, kind, capacity, limit=global_batch)
        device = Device(name=name, memory_gib=round(capacity / GIB, 1), fits=q.memory.peak <= capacity,
                        max_micro_batch=mb, grad_accum=math.ceil(global_batch / mb) if mb else 0)  # fmt: skip
        if peak is not None:
            device.mfu, device.mfu_source = card_mfu(cfg, name, history)
            device.hours = flops / (peak * 1e12 * device.mfu) / 3600
            price = cfg.plan.gpu_prices.get(name)
            device.cost = None if price is None else price * device.hours
        out.append(device)
    return out


def process_peak(quote: Quote, nproc: int, distributed: str) -> int:
    """Each process's peak in a job of ``nproc``: under ddp (or one process) the peak of the
    quote; under fsdp the decoder layers' weights, gradients and AdamW state a 1/nproc share,
    plus one layer gathered whole with its gradient (an estimate: the embedding, the head and
    the activations stay whole on every rank)."""
    m, s = quote.memory, quote.shape
    if distributed != "fsdp" or nproc < 2:
        return m.peak
    layers = s.layers * s.layer_params / s.params
    one_layer = (m.weights + m.gradients) * s.layer_params / s.params
    sharded = (m.weights + m.gradients + m.optimizer) * layers
    return int(m.peak - sharded * (1 - 1 / nproc) + one_layer)


def ram_bytes() -> float:
    """This machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def savings(quote: Quote) -> list[tuple[str, int]]:
    """What each usual change would bring the peak on this machine down to."""
    cfg = quote.cfg
    changes = [
        ("gradient checkpointing (model.gradient_checkpointing=true)", {"model": {"gradient_checkpointing": True}}),
        ("QLoRA 4-bit (method.name=qlora, CUDA only)", {"method": {"name": "qlora", "bits": 4}}),
        ("LoRA (method.name=lora)", {"method": {"name": "lora"}}),
        ("half the sequence length (data.max_seq_len)", {"data": {"max_seq_len": max(16, quote.data.max_len // 2)}}),
        ("micro-batch 1 (train.micro_batch_size=1, more accumulation)", {"train": {"micro_batch_size": 1}}),
        ("rank 8 (method.r=8)", {"method": {"r": 8}}),
    ]  # fmt: skip
    out = []
    for label, update in changes:
        changed = _updated(cfg, update)
        if changed.model_dump() == cfg.model_dump():
            continue
        data = quote.data
        if "data" in update:
            cut = update["data"]["max_seq_len"]
            data = replace(
                data, max_len=cut, worst_batch=(data.worst_batch[0], min(cut, data.worst_batch[1]))
            )
        if "train" in update:
            data = replace(data, worst_batch=(2 if data.pairs else 1, data.max_len))
        peak = estimate(
            quote.shape, changed, activity(changed, data, quote.here, hidden=quote.shape.hidden)
        ).peak
        if peak < quote.memory.peak:
            out.append((label, peak))
    return sorted(out, key=lambda x: x[1])


def _updated(cfg: Config, update: dict) -> Config:
    raw = cfg.model_dump()
    for section, values in update.items():
        raw[section].update(values)
    try:
        return Config.model_validate(raw)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _warnings(quote: Quote) -> list[str]:
    out = []
    if quote.total_steps < FEW_STEPS:
        out.append(f"only {quote.total_steps} optimizer steps: the schedule has no room (warmup and "
                   f"decay need some; aim for {FEW_STEPS}+ with more epochs or a smaller batch)")  # fmt: skip
    if quote.total_steps > MANY_STEPS:
        out.append(f"{quote.total_steps:,} optimizer steps: consider a larger global batch")
    if quote.data.estimated:
        out.append(quote.data.estimated)
    if not any(d.fits for d in quote.devices):
        out.append("the configured run fits none of the devices quoted: see 'what would fit'")
    if not quote.runs_here:
        out.append(f"method {quote.cfg.method.name} needs a CUDA GPU (bitsandbytes): the memory shown "
                   "is a GPU's; this machine can quote it but not run it")  # fmt: skip
    return out
