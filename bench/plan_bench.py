"""How long does planning take? ``tunelab train --dry-run`` (or ``tunelab plan``) on the
example config, end to end.

    python bench/plan_bench.py [--runs 5] [--config examples/extract/train.yaml] [--plan]

Runs the command in fresh processes (what a user waits for: interpreter start, imports, the
config, the data read and tokenized, the tokenizer loaded, no weights read) and prints each
wall time and the median. The model is pulled first if needed, outside the timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--config", default="examples/extract/train.yaml")
    ap.add_argument("--plan", action="store_true", help="Time `tunelab plan` instead.")
    args = ap.parse_args()
    from tunelab.config.load import load_config
    from tunelab.models.load import resolve_model

    resolve_model(load_config(ROOT / args.config).model.name)  # pulled and converted, untimed
    times = []
    with tempfile.TemporaryDirectory() as out:
        command = ["plan"] if args.plan else ["train", "--dry-run"]
        cmd = [sys.executable, "-m", "tunelab", *command, args.config,
               f"train.output_dir={out}", "name=bench"]  # fmt: skip
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"tunelab {' '.join(command)} {args.config}")
    print("runs (s): " + ", ".join(f"{t:.2f}" for t in times))
    print(f"median  : {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
