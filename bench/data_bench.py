"""How fast is the data layer? Check and tokenise N chat records of about 200 tokens.

    python bench/data_bench.py [--records 100000] [--model smollm2-135m-instruct]

Writes a synthetic JSONL file (system + user + assistant, ~200 tokens each with the SmolLM2
tokenizer), then times each stage in-process (read, validate, tokenise with weights, stats)
and the whole ``tunelab data check --model M`` command end to end in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the order customer city delivery blue mug package invoice phone number friday morning "
    "please send three large boxes to our office in lisbon madrid berlin before noon thanks "
    "regards support ticket refund account email address name quantity product request"
).split()


def make_file(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = " ".join(rng.choices(WORDS, k=rng.randint(55, 80)))
            reply = json.dumps(
                {
                    "id": i,
                    "city": rng.choice(WORDS),
                    "items": rng.choices(WORDS, k=rng.randint(15, 30)),
                }
            )
            row = {
                "messages": [
                    {"role": "system", "content": "Extract the order as JSON."},
                    {"role": "user", "content": f"Request {i}: {user}"},
                    {"role": "assistant", "content": reply},
                ]
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    from tunelab.config.schema import DataConfig
    from tunelab.data.pipeline import load_examples, tokenize_examples
    from tunelab.data.stats import compute_stats
    from tunelab.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)  # cached after the first run; not part of the timing
    cfg = DataConfig()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        make_file(path, args.records)
        size = path.stat().st_size
        t0 = time.perf_counter()
        examples = load_examples(path, cfg)
        t1 = time.perf_counter()
        report = tokenize_examples(examples, tokenizer, cfg)
        t2 = time.perf_counter()
        stats = compute_stats(
            examples, report, max_seq_len=cfg.max_seq_len, truncation=cfg.truncation
        )
        t3 = time.perf_counter()
        tokens = sum(report.lengths)
        cmd = [
            sys.executable,
            "-m",
            "tunelab",
            "data",
            "check",
            str(path),
            "--model",
            args.model,
            "--json",
            "-q",
        ]
        e0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
        e1 = time.perf_counter()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"data: {args.records} chat records, {size / 2**20:.1f} MiB, {tokens} tokens "
          f"(median {stats.length['median']:.0f} per record), tokenizer {args.model}")  # fmt: skip
    print(f"read + validate : {t1 - t0:6.2f} s")
    print(f"tokenise+weights: {t2 - t1:6.2f} s  ({tokens / (t2 - t1) / 1e3:.0f}k tokens/s)")
    print(f"statistics      : {t3 - t2:6.2f} s")
    print(f"in-process total: {t3 - t0:6.2f} s  ({args.records / (t3 - t0):.0f} records/s)")
    print(
        f"`tunelab data check --model` end to end (incl. start-up, tokenizer load): {e1 - e0:.2f} s"
    )


if __name__ == "__main__":
    main()
