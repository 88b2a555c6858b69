"""Keep what the model knew: the example task trained with and without each remedy.

    python bench/forgetting_study.py [--only NAME ...] [--out runs/forgetting-study]

Each variant is ``tunelab train examples/extract/train.yaml`` with a few overrides, run one
after another (each in its own process, the machine otherwise quiet). For each it reads the
run folder: the task score (the example's field accuracy on its test set, with a 95 %
bootstrap interval over the test examples), the forgetting check before and after (answer
contained, on examples/general/general.jsonl) and the change with its 95 % paired interval.
Writes ``study.json`` and ``study.md`` (the table docs/forgetting.md shows) into --out.
Every variant takes ~4-6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "extract" / "train.yaml"

VARIANTS = {  # name: (overrides, what it tries)
    "baseline": ([], "the example as it ships (LoRA r16, all linear layers, lr 1e-3, prompt loss weight 0.1)"),
    "self-0.25": (["data.replay=self", "data.replay_ratio=0.25"], "self-rehearsal, 2 of 8 sequences a step"),
    "self-0.5": (["data.replay=self", "data.replay_ratio=0.5"], "self-rehearsal, 4 of 8 sequences a step"),
    "lr-3e-4": (["train.lr=3e-4"], "a lower learning rate"),
    "r4": (["method.r=4"], "a smaller LoRA rank (4, alpha 8)"),
    "plw-0": (["data.prompt_loss_weight=0"], "no loss on the prompt"),
    "qv-only": (["method.targets=[q_proj,v_proj]"], "fewer target modules (attention q, v)"),
}  # fmt: skip


def bootstrap_mean(
    scores: list[float], seed: int = 0, resamples: int = 10000
) -> tuple[float, float, float]:
    x = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def scores(folder: Path, metric: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines() if x]
    return {
        r["index"]: float(r["scores"][metric]) for r in rows if r["scores"].get(metric) is not None
    }


def read_run(run: Path) -> dict:
    from tunelab.evaluate.compare import paired_bootstrap

    result = json.loads((run / "result.json").read_text())
    task_meta = json.loads((run / "eval" / "finetuned" / "metrics.json").read_text())
    metric = "task" if "task" in task_meta["metrics"] else "json_equal"  # eval.metric's score
    task = bootstrap_mean(list(scores(run / "eval" / "finetuned", metric).values()))
    before = scores(run / "eval" / "general-before", "contains")
    after = scores(run / "eval" / "general-after", "contains")
    keys = sorted(set(before) & set(after))
    b, a = np.mean([before[k] for k in keys]), np.mean([after[k] for k in keys])
    _, lo, hi = paired_bootstrap([before[k] for k in keys], [after[k] for k in keys])
    return {
        "task_metric": metric, "task": task, "general_before": float(b), "general_after": float(a),
        "general_change": float(a - b), "general_ci": [lo, hi], "general_questions": len(keys),
        "steps": result["steps"], "seconds": result["seconds"], "replay": result.get("replay"),
        "best_eval_loss": result.get("best_eval_loss"),
    }  # fmt: skip


def table(rows: dict, notes: dict) -> str:
    lines = ["| variant | what | task: field accuracy (95 % CI) | forgetting check before → after | change (95 % CI) | steps |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        m, lo, hi = r["task"]
        lines.append(
            f"| {name} | {notes[name]} | {m:.1%} ({lo:.1%}–{hi:.1%}) | {r['general_before']:.1%} → "
            f"{r['general_after']:.1%} | {r['general_change'] * 100:+.1f} pts "
            f"({r['general_ci'][0] * 100:+.1f} to {r['general_ci'][1] * 100:+.1f}) | {r['steps']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "forgetting-study")
    parser.add_argument("extra", nargs="*", help="overrides for every variant (key=value)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    rows, notes = {}, {name: VARIANTS[name][1] for name in VARIANTS}
    study = args.out / "study.json"
    for name in VARIANTS:  # variants run earlier into this folder are read back
        if name not in names and (args.out / name / "result.json").is_file():
            rows[name] = read_run(args.out / name)
    for name in names:
        run = args.out / name
        if not (run / "result.json").is_file():
            command = [sys.executable, "-m", "tunelab", "train", str(CONFIG), "-q", f"name={name}",
                       f"train.output_dir={args.out}", *VARIANTS[name][0], *args.extra]  # fmt: skip
            print("$", " ".join(command[2:]), flush=True)
            started = time.time()
            subprocess.run(command, check=True, cwd=ROOT)
            print(f"{name}: {time.time() - started:.0f} s", flush=True)
        rows[name] = read_run(run)
        record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "rows": rows}  # fmt: skip
        study.write_text(json.dumps(record, indent=1) + "\n")
        (args.out / "study.md").write_text(table(rows, notes))
        print(table({name: rows[name]}, notes), flush=True)
    print(table(rows, notes))


if __name__ == "__main__":
    main()
