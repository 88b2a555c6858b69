"""Training speed on this machine: tunelab against Hugging Face Trainer + PEFT, side by side.

    python bench/train_speed.py [--steps 20] [--config examples/extract/train.yaml]
                                [--data alpaca] [--contenders tunelab,tunelab-plw0,hf,hf-bf16]
                                [--json FILE]
    python bench/train_speed.py --shape llama-3.2-1b [--method lora|full] [--steps 100]
                                [--warmup 10] [--repeats 3] --contenders tunelab,hf-shuffled,hf,hf-bf16-compile

Every contender runs in its own process, one after another, on the *same optimizer steps*: the
parent builds tunelab's step plan from the config (data read, tokenised with its loss weights,
micro-batches drawn) and hands the very token ids to the Hugging Face contenders in that order;
tunelab's own run logs a checksum of each step's examples, compared here ("batches: identical").

Contenders (LoRA as the config sets it; the first step is timed apart):
  tunelab       the config as written (its prompt_loss_weight, its precision)
  tunelab-compile  the same with train.compile=on (auto compiles short runs only when cached)
  tunelab-eager   the same with train.compile=off (what auto's compiling bought, in long runs)
  tunelab-cached  the defaults on a machine where a run of the same layer graph compiled
                before (an untimed 1-step compiled run first, into the same inductor cache):
                auto then compiles runs of 10+ steps on a CPU (train/speed.py)
  tunelab-plw0  prompt_loss_weight 0 in fp32: Hugging Face's objective and precision, for loss
                parity with ``hf``
  tunelab-fp32  the same as tunelab with model.precision=fp32 (what auto chose before bf16)
  tunelab-bf16  the same as tunelab with model.precision=bf16
  tunelab-budget  the same with train.micro_batch_tokens = micro_batch_size x data.max_seq_len
                (each step's sequences in as few forwards as fit what the settings allow one)
  hf            Trainer + PEFT as users write it: fp32, DataCollatorForSeq2Seq (pad to the
                longest of the batch), prompt labels -100
  hf-bf16       the same with bf16=True (autocast)
  hf-bf16-compile  the same with torch_compile=True
  hf-shuffled   hf on the same examples in a random order (HF's default sampler), so each of its
                micro-batches mixes lengths as a user's run does; not the same optimizer steps,
                so no loss parity, but the same real tokens in all

**GPU mode** (``--shape``, PERFORMANCE.md's protocol; ``bench/protocol.py``): a random-initialised
model of that shape saved once with a word-level tokenizer of its vocabulary, Alpaca-like
conversations whose tokens follow a fixed Markov chain, 16 x 6 sequences (~16k real tokens) a
step, LoRA r 16 alpha 16 on all linear layers or full fine-tuning (``--method``),
prompt_loss_weight 0 (HF's objective, so ``tunelab`` and ``hf`` are the loss-parity pair). On a
GPU the Hugging Face contenders load the weights in bf16 and use sdpa and fused AdamW (the
protocol's baselines: ``hf-shuffled`` is "HF + PEFT, padded, eager", ``hf-bf16-compile`` the
compiled one); timers are synchronised; memory is ``torch.cuda.max_memory_allocated``; MFU is
against the GPU's dense bf16 peak (PERFORMANCE.md's arithmetic: LoRA 4N + 6 N_lora, full 6N, N
with the LM head, plus attention). ``--shape tiny`` runs the same path on a CPU in seconds.

``--data alpaca`` replaces the config's data with synthetic Alpaca-like records (seeded): an
instruction of ~12 words, an input for 40 % of them, an answer of ~45 words with a long tail
(lognormal), so sequences run from ~30 to ~500 tokens as in Alpaca. There, padding is most of a
shuffled batch: ``hf-shuffled`` is the padded baseline users get.

Each contender compiles (if it does) with an empty inductor cache: its first step shows the cold
cost. Printed: real (non-padding) tokens/s over the timed steps, median s/step, first-step seconds,
peak RSS, the last loss, the ratio to ``hf``, and the achieved GFLOP/s against the peak of a
large matrix product (fp32 and bf16) measured in the same run. Loss parity: tunelab-plw0 and hf
on the same steps (the first step is before any update, so it must agree to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import protocol  # bench/protocol.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
#: No warmup for any contender: tunelab's first update is not at lr 0 and Hugging Face's is, so
#: with warmup the curves differ by a step; without it both follow the same cosine (no change
#: to the speed)
SAME_SCHEDULE = ("train.warmup_ratio=0",)
#: contenders that set train.compile
COMPILE = {"tunelab-compile": "on", "tunelab-eager": "off"}
CONTENDERS = (
    "tunelab",
    "tunelab-compile",
    "tunelab-eager",
    "tunelab-cached",
    "tunelab-plw0",
    "tunelab-fp32",
    "tunelab-bf16",
    "tunelab-budget",
    "hf",
    "hf-bf16",
    "hf-bf16-compile",
    "hf-shuffled",
)


# -- the parent ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after the first)")
    ap.add_argument("--config", default="examples/extract/train.yaml")
    ap.add_argument("--data", choices=["config", "alpaca"], default="config",
                    help="the config's data, or synthetic Alpaca-like lengths")  # fmt: skip
    ap.add_argument("--contenders", default="tunelab,tunelab-plw0,hf,hf-bf16")
    ap.add_argument("--shape", choices=sorted(protocol.SHAPES),
                    help="GPU mode: PERFORMANCE.md's protocol on a model of this shape")  # fmt: skip
    ap.add_argument("--method", choices=["lora", "full"], default="lora", help="with --shape")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 1; 10 with --shape)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each contender (median)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.warmup = args.warmup if args.warmup is not None else 10 if args.shape else 1
    if args.child:
        return child(args.child, Path(args.work), args.config, args.steps + args.warmup)
    names = args.contenders.split(",")
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        sys.exit(f"--contenders: unknown {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.shape:
            args.config = str(protocol.protocol_config(args.shape, work, method=args.method,
                                                       steps=args.steps + args.warmup))  # fmt: skip
        elif args.data == "alpaca":
            args.config = str(alpaca_config(ROOT / args.config, work))
        steps = prepare(args.config, args.steps + args.warmup, work)
        peaks = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
        # in rounds, every contender once a round: a pair of runs sees the same hour of a
        # machine whose speed drifts (this project's VM: ±30 % between runs minutes apart)
        rounds = [
            {name: run_child(name, work, args) for name in names} for _ in range(args.repeats)
        ]
        results = {name: median_run([r[name] for r in rounds], args) for name in names}
        flops = model_flops(args.config)  # while a generated config still exists
    report(results, steps, peaks, flops, args, rounds)


def prepare(config: str, steps: int, work: Path) -> list[dict]:
    """tunelab's step plan for ``config``: each step's micro-batches as token ids and weights."""
    from tunelab.config.load import load_config
    from tunelab.models.load import resolve_model
    from tunelab.train.batches import StepPlan
    from tunelab.train.plan import build_plan

    cfg = load_config(ROOT / config, [f"train.output_dir={work / 'plan'}", *SAME_SCHEDULE])
    resolve_model(cfg.model.name)  # pulled and converted once, untimed
    plan = build_plan(cfg, read_weights=False)
    t = cfg.train
    budgeted = StepPlan(plan.steps.lengths, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                        seed=t.seed, max_tokens=budget(cfg))  # fmt: skip
    out = []
    for k in range(steps):
        _, micro = plan.steps.step(k)
        out.append({
            "order": zlib.crc32(repr(micro).encode()),
            "order_budget": zlib.crc32(repr(budgeted.step(k)[1]).encode()),  # same sequences
            "micro": [[{"ids": [int(t) for t in plan.train[i].seq.input_ids],
                        "weights": [float(w) for w in plan.train[i].seq.weights]} for i in mb]
                      for mb in micro],
        })  # fmt: skip
    (work / "steps.json").write_text(json.dumps(out))
    return out


WORDS = (
    "the order customer box number city price send today please list item change "
    "make write explain short answer why when where which first second data model "
    "example plan river light music garden window story people water table system"
).split()


def alpaca_config(config: Path, work: Path, n: int = 600, seed: int = 0) -> Path:
    """``config`` with its data replaced by ``n`` synthetic Alpaca-like records (module doc)."""
    import random

    import yaml

    rng = random.Random(seed)

    def words(median: float, sigma: float, cap: int) -> str:
        count = max(1, min(cap, round(rng.lognormvariate(0, sigma) * median)))
        return " ".join(rng.choice(WORDS) for _ in range(count))

    rows = [{"instruction": words(12, 0.5, 60), "input": words(15, 0.8, 80) if rng.random() < 0.4 else "",
             "output": words(45, 0.9, 300)} for _ in range(n)]  # fmt: skip
    data = work / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["data"] = {**cfg["data"], "path": str(data), "val_path": None, "val_ratio": 0.0}
    cfg.pop("eval", None)
    out = work / "alpaca.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def matmul_peak(dtype: str, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of a large square matrix product in ``dtype`` on this machine (its GPU if any)."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else n
    a = torch.randn(n, n, device="cuda" if cuda else "cpu").to(getattr(torch, dtype))
    b = torch.randn_like(a)
    sync = torch.cuda.synchronize if cuda else lambda: None
    a @ b  # warm-up
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        sync()
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def run_child(name: str, work: Path, args) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    print(f"running {name} ...", flush=True)
    for stale in (work / name, work / f"inductor-{name}"):  # a repeat starts afresh and cold
        shutil.rmtree(stale, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}")}
    if name == "tunelab-cached":  # an earlier run of the same graph, in a process of its own
        earlier = [*cmd[:3], "tunelab-earlier", *cmd[4:]]
        subprocess.run(earlier, cwd=ROOT, stdout=subprocess.DEVNULL, env=env, check=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}): run {' '.join(cmd)}")
    result = json.loads(out.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def median_run(runs: list[dict], args) -> dict:
    """The run of median speed among a contender's repeats, with the spread of all of them."""
    speeds = [_speed(r, args.warmup) for r in runs]
    best = sorted(range(len(runs)), key=speeds.__getitem__)[len(runs) // 2]
    return {**runs[best], "spread": [min(speeds), max(speeds)]}


def report(results: dict, steps: list[dict], peaks: dict, flops: float, args,
           rounds: list[dict]) -> None:  # fmt: skip
    base, w = results.get("hf"), args.warmup
    gpu = gpu_name()
    print(f"\nmachine: {gpu or cpu_name()}, {os.cpu_count()} CPU cores; {versions()}")
    print(f"config: {args.config}; {args.steps} timed steps after {w} untimed; "
          f"{args.repeats} run(s) of each (the median shown); matmul peak fp32 "
          f"{peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f}; "
          f"{flops / 1e9:.2f} GFLOP per real token")  # fmt: skip
    nominal = next((v for k, v in DENSE_BF16_PEAK.items() if gpu and k in gpu), None)
    memory = "peak GPU MiB" if gpu else "peak RSS MiB"
    print(f"\n| contender | precision | real tokens/s (spread) | × hf | s/step (median) | first step s "
          f"| whole run s | {memory} | last loss | GFLOP/s (% of peak) |"
          f"{' MFU |' if nominal else ''}\n|---|---|---|---|---|---|---|---|---|---|"
          f"{'---|' if nominal else ''}")  # fmt: skip
    for name, r in results.items():
        timed = r["seconds"][w:]
        speed = _speed(r, w)
        ratio = f"{speed / _speed(base, w):.2f}" if base else "—"
        peak = peaks["bfloat16" if r["precision"].startswith("bf16") else "float32"]
        achieved = speed * flops / 1e9
        low, high = r["spread"]
        mfu = f" {100 * achieved * 1e9 / nominal:.1f} % |" if nominal else ""
        print(f"| {name} | {r['precision']} | {speed:.1f} ({low:.1f}–{high:.1f}) | {ratio} | "
              f"{statistics.median(timed):.2f} | {sum(r['seconds'][:w]):.2f} | {sum(r['seconds']):.1f} | "
              f"{r.get('peak_gpu_mib', r['peak_rss_mib']):.0f} | {r['losses'][-1]:.4f} | "
              f"{achieved:.0f} ({100 * achieved / peak:.0f} %) |{mfu}")  # fmt: skip
    if "hf-shuffled" in results:
        shuffled = _speed(results["hf-shuffled"], w)
        print("× hf-shuffled (the padded baseline of a shuffled run): " + ", ".join(
            f"{name} {_speed(r, w) / shuffled:.2f}" for name, r in results.items()))  # fmt: skip
        whole = sum(results["hf-shuffled"]["seconds"])
        print(
            "whole run, first steps and compilation included, hf-shuffled's seconds / each's: "
            + ", ".join(f"{name} {whole / sum(r['seconds']):.2f}" for name, r in results.items())
        )
    round_ratios(rounds, w)
    for name, r in results.items():
        if "orders" in r:
            key = "order_budget" if name == "tunelab-budget" else "order"
            same = r["orders"] == [s[key] for s in steps]
            print(f"batches of {name}: {'identical to the plan' if same else 'DIFFERENT'}")
    pairs = [("tunelab-plw0", "hf"), ("tunelab", "tunelab-fp32")]
    if args.shape:  # prompt_loss_weight 0 there: tunelab's defaults are HF's objective
        pairs.append(("tunelab", "hf"))
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = results[ours]["losses"], results[theirs]["losses"]
            rel = [abs(x - y) / y for x, y in zip(a, b, strict=True)]
            mean_a, mean_b = statistics.mean(a), statistics.mean(b)
            print(f"loss parity {ours} vs {theirs}: first step |Δ|/loss {rel[0]:.1e}; mean loss "
                  f"over {len(rel)} steps {mean_a:.4f} vs {mean_b:.4f} ({mean_a / mean_b - 1:+.2%}); "
                  f"mean per-step |Δ|/loss {statistics.mean(rel):.2%}")  # fmt: skip
    if args.json:
        speeds = [{name: _speed(r, w) for name, r in one.items()} for one in rounds]
        Path(args.json).write_text(json.dumps({"results": results, "peaks": peaks,
                                               "rounds": speeds}, indent=1))  # fmt: skip


def round_ratios(rounds: list[dict], warmup: int) -> None:
    """With repeats, each contender's speed over each baseline's in the same round, and their
    median: steadier than the ratio of the medians when the machine's speed drifts."""
    if len(rounds) < 2:
        return
    for base in ("hf-shuffled", "hf"):
        if base not in rounds[0]:
            continue
        parts = []
        for name in rounds[0]:
            if name != base:
                ratios = [_speed(r[name], warmup) / _speed(r[base], warmup) for r in rounds]
                listed = ", ".join(f"{x:.2f}" for x in ratios)
                parts.append(f"{name} {listed} (median {statistics.median(ratios):.2f})")
        print(f"× {base} round by round: " + "; ".join(parts))


def _speed(r: dict, warmup: int) -> float:
    return sum(r["tokens"][warmup:]) / sum(r["seconds"][warmup:])


#: dense bf16 peak FLOP/s of the GPUs PERFORMANCE.md names (MFU's denominator)
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_flops(config: str) -> float:
    """Training FLOPs per real token by PERFORMANCE.md's arithmetic: LoRA 4N + 6 N_adapter, full
    6N, N with the LM head over every token (tunelab skips the head where the loss weight is 0:
    a saving, not counted), plus attention over the data's s_eff."""
    from tunelab.config.load import load_config
    from tunelab.models.methods import get_method
    from tunelab.workflow.quote import make_quote

    cfg = load_config(ROOT / config, ["train.output_dir=/tmp/tunelab-bench-unused"])
    quote = make_quote(cfg)
    return quote.shape.train_flops_per_token(
        trains_base=get_method(cfg.method).trains_base, adapter=quote.memory.trainable,
        s_eff=quote.data.s_eff,
    )  # fmt: skip


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def cpu_name() -> str:
    from tunelab.models.device import device_name

    return device_name("cpu").removeprefix("cpu:")


def versions() -> str:
    import peft
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")  # fmt: skip


# -- the contenders ------------------------------------------------------------------------------


def child(name: str, work: Path, config: str, steps: int) -> None:
    """Run contender ``name`` for ``steps`` optimizer steps; its timings to ``work/NAME.json``."""
    import torch

    result = run_tunelab(name, work, config, steps) if name.startswith("tunelab") else \
        run_hf(name, work, config)  # fmt: skip
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (work / f"{name}.json").write_text(json.dumps(result))


def run_tunelab(name: str, work: Path, config: str, steps: int) -> dict:
    from tunelab.config.load import load_config
    from tunelab.workflow.finetune import finetune

    overrides = [*SAME_SCHEDULE, f"train.output_dir={work / name}", "name=run", f"train.max_steps={steps}",
                 "train.eval_at_start=false", f"train.eval_steps={steps}", "eval.at_end=false",
                 "train.keep=last"]  # fmt: skip
    if name == "tunelab-plw0":
        overrides += ["data.prompt_loss_weight=0", "model.precision=fp32"]
    if name in COMPILE:
        overrides.append(f"train.compile={COMPILE[name]}")
    if name == "tunelab-budget":
        overrides.append(f"train.micro_batch_tokens={budget(load_config(ROOT / config))}")
    if name in ("tunelab-fp32", "tunelab-bf16"):
        overrides.append(f"model.precision={name.removeprefix('tunelab-')}")
    if name == "tunelab-earlier":  # tunelab-cached's earlier run (run_child): one step, compiled
        overrides += ["train.compile=on", "train.max_steps=1", "train.eval_steps=1"]
    run = finetune(load_config(ROOT / config, overrides), log=lambda *a, **k: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    result = json.loads((run / "result.json").read_text())
    return {
        "tokens": [r["tokens"] for r in records],
        "seconds": [r["tokens"] / r["tokens_per_s"] for r in records],
        "losses": [r["loss"] for r in records],
        "orders": [r["order"] for r in records],
        "precision": result["precision"] + (" compiled" if result["compiled"] else ""),
    }


def budget(cfg) -> int:
    """tunelab-budget's train.micro_batch_tokens: the most tokens the settings allow a forward."""
    return cfg.train.micro_batch_size * cfg.data.max_seq_len


def run_hf(name: str, work: Path, config: str) -> dict:
    """Trainer + PEFT as a user writes it, fed the plan's examples in the plan's order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from tunelab.config.load import load_config
    from tunelab.models.load import resolve_model
    from tunelab.train.optim import warmup_steps

    cfg = load_config(ROOT / config, [f"train.output_dir={work / name}", *SAME_SCHEDULE])
    steps = json.loads((work / "steps.json").read_text())
    rows = [{"input_ids": e["ids"], "attention_mask": [1] * len(e["ids"]),
             "labels": [t if w >= 1 else -100 for t, w in zip(e["ids"], e["weights"], strict=True)]}
            for step in steps for mb in step["micro"] for e in mb]  # fmt: skip
    if name == "hf-shuffled":  # HF's RandomSampler over the same examples, seeded
        import random

        random.Random(cfg.train.seed).shuffle(rows)
    path = resolve_model(cfg.model.name)
    cuda = torch.cuda.is_available()  # the protocol's baselines there: bf16 weights, sdpa
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa",
        device_map="cuda" if cuda else None,
    )  # fmt: skip
    torch.manual_seed(cfg.train.seed)  # as tunelab seeds: the same initial adapter
    m = cfg.method
    if m.name != "full":
        model = get_peft_model(model, LoraConfig(r=m.r, lora_alpha=m.alpha or 2 * m.r, lora_dropout=m.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(work / name), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, max_steps=len(steps), learning_rate=t.lr,
        lr_scheduler_type=t.schedule, warmup_steps=warmup_steps(t, len(steps)), logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not cuda, dataloader_num_workers=0,
        bf16="bf16" in name or cuda, torch_compile="compile" in name, seed=cfg.train.seed,
        **({"optim": "adamw_torch_fused"} if cuda else {}),  # the CPU: HF's default
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    clock = Clock()

    class InOrder(Trainer):  # the plan's order, not a shuffle
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=rows, callbacks=[clock],
                      data_collator=DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(path),
                                                           padding=True))  # fmt: skip
    trainer.train()
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    tokens = [sum(len(r["input_ids"]) for r in rows[k : k + per_step])
              for k in range(0, len(rows), per_step)]  # fmt: skip
    return {"tokens": tokens, "seconds": clock.seconds, "losses": clock.losses,
            "precision": "bf16" if "bf16" in name or cuda else "fp32"}  # fmt: skip


class Clock:
    """A Trainer callback: the wall time of each optimizer step and its logged loss."""

    def __init__(self):
        self.seconds, self.losses, self.last = [], [], None

    def __getattr__(self, event):  # every other callback event: nothing to do
        if event.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(event)

    def on_train_begin(self, *a, **k):
        self.last = time.perf_counter()

    def on_step_end(self, *a, **k):
        import torch

        if torch.cuda.is_available():  # the step's kernels done, not only queued
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def on_log(self, args, state, control, logs=None, **k):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


if __name__ == "__main__":
    main()
