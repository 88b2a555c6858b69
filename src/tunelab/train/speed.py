"""The speed choices of a plan, each with its reason: whether to compile the decoder layers
(``train.compile``) and whether to pack micro-batches into single rows (``train.packing``).
The attention implementation and the precision are the device's (:mod:`tunelab.models.device`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from tunelab.errors import ConfigError, ModelError
from tunelab.files import atomic_write_json
from tunelab.models.catalog import home
from tunelab.models.device import two_attentions
from tunelab.models.shape import model_shape
from tunelab.train.batches import StepPlan

#: train.compile auto weighs the seconds compiling costs against the seconds it saves. Measured
#: on a 2-core CPU with the default model, LoRA, bf16 (docs/speed.md): eager steps did ~180
#: GFLOP/s of training work, compiled steps took 29 % less time, and compiling cost ~48 s cold,
#: ~5 s with the layer graph in the inductor cache. Not measured on a GPU yet: PERFORMANCE.md's
#: H100 figures (HF eager ~24 % MFU, compiled 32 % less time, 40-90 s to compile) stand in.
EAGER_FLOPS = {"cpu": 180e9, "cuda": 240e12}
COMPILE_SAVES = {"cpu": 0.29, "cuda": 0.32}
COMPILE_COST_S = {"cpu": (48.0, 5.0), "cuda": (60.0, 10.0)}  # (cold, cached)
#: a second layer graph in the same run (a CPU's eager attention for short batches and SDPA for
#: long ones) shares most kernels with the first: +19 s cold on Alpaca-like lengths (2026-12-01)
SECOND_GRAPH_S = (20.0, 5.0)  # (cold, cached)
#: the marker of a layer graph compiled before, kept in the inductor cache it was compiled into
COMPILED_MARKS = "tunelab-compiled"


def choose_compile(
    setting: str,
    train_flops: float | None = None,
    device: str = "cpu",
    key: str | None = None,
    graphs: int = 1,
) -> tuple[bool, str]:
    """(compile the decoder layers?, why) for ``train.compile``; ``on`` without a C++ compiler
    (torch's inductor needs one) is refused here, before anything loads.

    ``auto`` estimates the run's eager seconds from its training FLOPs (``train_flops``) and
    compiles where the share compiling saves repays the compilation: within this run when the
    layer graph (``key``, :func:`compile_key`) is in the inductor cache already; cold, over this
    run and the next like it, which then finds the graph cached. ``graphs``: 2 where the run's
    micro-batches use two attentions (a CPU's ``<matmul>+sdpa``), each a graph to compile. The
    rates are this machine's where runs of the graph measured them (:func:`estimate`)."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if setting == "off":
        return False, ""
    if compiler is None:
        if setting == "on":
            raise ConfigError(
                "train.compile: 'on' needs a C++ compiler for torch.compile (install g++), or "
                "set train.compile=off"
            )
        return False, "compile: auto: off (no C++ compiler for torch.compile)"
    if setting == "on":
        return True, "compile: on"
    if train_flops is None:
        return False, "compile: auto: off (the model's size is unknown: no estimate of the gain)"
    device = "cuda" if device == "cuda" else "cpu"
    eager, saved, rate = estimate(train_flops, device, key)
    extra = graphs - 1  # a second graph costs less than the first: they share kernels
    cold = COMPILE_COST_S[device][0] + extra * SECOND_GRAPH_S[0]
    cached = COMPILE_COST_S[device][1] + extra * SECOND_GRAPH_S[1]
    which = f" for {graphs} graphs (two attentions)" if extra else ""
    if key is not None and compiled_before(key):
        pays, cost = saved >= cached, f"~{cached:.0f} s to load{which}, compiled before"
    else:
        pays, cost = 2 * saved >= cold + cached, f"~{cold:.0f} s cold{which}, repaid over two runs"
    verdict = "on" if pays else "off"
    return pays, (f"compile: auto: {verdict} (~{eager:.0f} s of eager steps at {rate}, "
                  f"~{saved:.0f} s saved; {cost})")  # fmt: skip


def estimate(train_flops: float, device: str, key: str | None) -> tuple[float, float, str]:
    """(eager seconds, seconds compiling saves, the eager rate in words) of ``train_flops``.
    Where earlier runs of the layer graph ``key`` measured this machine's rates
    (:func:`remember_rate`) they replace the assumptions: both, the measured saving; the
    compiled one alone, the eager rate it implies at the assumed saving; the eager one alone,
    the assumed saving of it. CPUs differ: eager ~180 GFLOP/s and 29 % saved on a Xeon with
    AMX, 270-340 GFLOP/s and 10-19 % on an AMD EPYC (docs/speed.md)."""
    measured = measured_rates(key) if key is not None else {}
    share = COMPILE_SAVES[device]
    if "eager" in measured:
        rate, how = measured["eager"], "measured here"
    elif "compiled" in measured:
        rate, how = measured["compiled"] * (1 - share), "from compiled steps measured here"
    else:
        rate, how = EAGER_FLOPS[device], ""
    eager = train_flops / rate
    if {"eager", "compiled"} <= measured.keys():
        saved = max(0.0, eager - train_flops / measured["compiled"])
    else:
        saved = share * eager
    words = f"{rate / 1e12:.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.0f} GFLOP/s"
    return eager, saved, f"~{words}" + (f" {how}" if how else "")


def layer_graphs(attention: str) -> int:
    """How many layer graphs a compiled run of ``attention`` builds: two for a CPU's
    ``<matmul>+sdpa`` (each micro-batch's attention by its width), else one."""
    return 2 if two_attentions(attention) else 1


def compile_key(
    model_config: dict, method: dict, precision: str, device: str, attention: str
) -> str:
    """A name for the decoder layer graph a run compiles: what shapes it (the model's config,
    the method's settings, precision, device, attention) and the code that builds it (the
    installed versions, read from the package metadata: importing torch and transformers to ask
    would cost ``tunelab plan`` a second and a half)."""
    code = [importlib.metadata.version(name) for name in ("torch", "transformers", "peft")]
    what = [model_config, method, precision, device, attention, *code]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def inductor_cache() -> Path:
    """Where torch's inductor keeps what it compiled: ``TORCHINDUCTOR_CACHE_DIR`` when set, else
    tunelab's home (kept across reboots, unlike inductor's default under /tmp)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or home() / "inductor")


def use_inductor_cache() -> None:
    """Point inductor at :func:`inductor_cache` (before its first compilation)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache()))


def _marks() -> Path:
    """The folder of tunelab's marks of compiled graphs, and their measured rates."""
    return inductor_cache() / COMPILED_MARKS


def compiled_before(key: str) -> bool:
    return (_marks() / key).is_file()


def measured_rates(key: str) -> dict[str, float]:
    """The training FLOP/s runs of layer graph ``key`` measured on this machine: ``eager``,
    ``compiled``, either or none (an unreadable record counts as none)."""
    try:
        rates = json.loads(_rates_file(key).read_text())
        return {k: float(rates[k]) for k in ("eager", "compiled") if rates.get(k, 0) > 0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def remember_rate(key: str, compiled: bool, flops_per_s: float) -> None:
    """Record a finished run's steady training FLOP/s for ``key`` (compiled or eager; the
    newest replaces the last), for :func:`estimate`. A record that cannot be written only
    means the next run decides by the assumptions."""
    rates = measured_rates(key) | {"compiled" if compiled else "eager": flops_per_s}
    with contextlib.suppress(OSError):
        _rates_file(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_rates_file(key), {kind: round(r) for kind, r in rates.items()})


def _rates_file(key: str) -> Path:
    """Where :func:`remember_rate` keeps ``key``'s rates: beside the graph's cache marker."""
    return _marks() / f"{key}.rates.json"


def remember_compiled(key: str) -> None:
    """Mark ``key``'s graph as in the cache (after a step ran compiled; a marker that cannot be
    written only means the next run decides as if cold)."""
    with contextlib.suppress(OSError):
        _marks().mkdir(parents=True, exist_ok=True)
        (_marks() / key).touch()


#: On a CPU in bf16 every new batch width costs oneDNN new kernels (~1 MiB each, kept): with
#: exact widths the default model's example run slowed from 289 to 234 real tokens/s over 50
#: steps and grew to 3.6 GiB; padded to a multiple of 32 it held 313-333 with 2.6 GiB
#: (docs/speed.md), the padding's extra work included.
CPU_BF16_PAD = 32


def pad_multiple(device: str, precision: str) -> int | None:
    """The multiple batch widths are padded to: :data:`CPU_BF16_PAD` on a CPU in bf16."""
    return CPU_BF16_PAD if device == "cpu" and precision == "bf16" else None


#: train.packing auto packs when the packed rows cost at most this share of the padded ones:
#: the margin covers what the FLOP count leaves out (a longer row can move a CPU from eager
#: attention to SDPA, ~20 % slower a step on the default model)
PACK_MAX_COST = 0.8
#: ... and with the flash varlen kernel (a GPU), whose packed rows cost only their real tokens:
#: any padding worth removing
PACK_MAX_COST_VARLEN = 0.98
#: ... and by document on a CPU (the gathered matmuls, models/varlen.py): 16 % fewer tokens made
#: the default model's Alpaca-like steps only ~4 % faster (docs/speed.md), so a CPU packs where
#: the padding is far larger than what sorting leaves
PACK_MAX_COST_CPU = 0.8


def choose_packing(setting: str, objective, steps: StepPlan, model_config: dict,
                   trains_base: bool, by_document: bool = False, pad_to: int | None = None,
                   device: str = "cuda") -> tuple[bool, str]:  # fmt: skip
    """(pack each micro-batch into one row?, why) for ``train.packing``. ``by_document``: a
    varlen attention will run packed rows (each document's attention alone); ``pad_to``: the
    multiple rows' widths are padded to; ``device``: where (a CPU packs less readily)."""
    if setting == "off":
        return False, ""
    if not objective.can_pack:
        if setting == "on":
            raise ConfigError(f"train.packing: 'on' works with train.objective=sft only "
                              f"({objective.name} sums each sequence apart); set it to auto or off")  # fmt: skip
        return False, ""
    if setting == "on":
        return True, "packing: on"
    padded, packed = packing_costs(steps, model_config, trains_base, by_document, pad_to)
    if padded is None:
        return False, "packing: auto: off (this model family cannot be sized)"
    if not by_document:
        limit = PACK_MAX_COST
    else:
        limit = PACK_MAX_COST_CPU if device == "cpu" else PACK_MAX_COST_VARLEN
    verdict = "on" if packed <= limit * padded else "off"
    kernel = ", varlen attention" if by_document else ""
    return verdict == "on", (f"packing: auto: {verdict} (packed rows {packed / padded:.0%} of "
                             f"the padded batches' FLOPs{kernel})")  # fmt: skip


def packing_costs(
    steps: StepPlan, model_config: dict, trains_base: bool, by_document: bool = False,
    pad_to: int | None = None,
):  # fmt: skip
    """(padded, packed) training FLOPs of the first epoch's micro-batches: padded, each row is
    as long as the longest of its micro-batch; packed, one row of them all whose attention
    spans the whole row — or, ``by_document``, each sequence's own length (varlen attention).
    Either row's width is rounded up to a multiple of ``pad_to``. (None, None) for a model
    family that cannot be sized."""
    try:
        shape = model_shape(model_config)
    except ModelError:
        return None, None

    def cost(tokens: int, span: int) -> float:
        return tokens * shape.train_flops_per_token(trains_base=trains_base, adapter=0, s_eff=span)

    def padding(tokens: int) -> int:
        return -tokens % pad_to if pad_to else 0

    padded = packed = 0.0
    for step in steps.epoch(0):
        for micro in step:
            lengths = [steps.lengths[i] for i in micro]
            width = max(lengths) + padding(max(lengths))
            padded += cost(len(lengths) * width, width)
            fill = padding(sum(lengths))  # the last sequence's padding (data/collate.py::pack)
            if by_document:
                packed += sum(cost(n, n) for n in lengths) + cost(fill, lengths[-1] + fill)
            else:
                packed += cost(sum(lengths) + fill, sum(lengths) + fill)
    return padded, packed
