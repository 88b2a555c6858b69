"""How fast is evaluation? Generate and score N examples of the example task.

    python bench/eval_bench.py [--examples 500] [--model smollm2-135m-instruct] [--batch-size 32]

Takes the example task's test set (100 records), repeats it to N examples, and runs the same
path as ``tunelab eval`` (batched greedy generation with a KV cache, then every metric and the
reference loss), printing the time per stage.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    import torch

    from tunelab.config.schema import EvalConfig
    from tunelab.evaluate.run import evaluate_examples, load_eval_examples, load_target

    base = load_eval_examples(ROOT / "examples" / "extract" / "test.jsonl")
    examples = (base * (args.examples // len(base) + 1))[: args.examples]
    t0 = time.perf_counter()
    target = load_target(args.model)
    t1 = time.perf_counter()
    cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        meta = evaluate_examples(
            target, examples, cfg, Path(tmp), name="bench", data_label="test x N"
        )
    t2 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"
    )
    print(
        f"{args.examples} examples, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, {args.model}"
    )
    print(f"load model      : {t1 - t0:6.1f} s")
    print(
        f"generate        : {meta['generation_seconds']:6.1f} s  ({args.examples / meta['generation_seconds']:.2f} examples/s)"
    )
    print(f"score + ref loss: {meta['seconds'] - meta['generation_seconds']:6.1f} s")
    print(f"total           : {t2 - t0:6.1f} s")
    print(f"json_equal {meta['metrics'].get('json_equal'):.3f} (the base model, zero-shot)")


if __name__ == "__main__":
    main()
