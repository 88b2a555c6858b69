"""Load test of `tunelab serve` on loopback: concurrent clients, bounded in count and time.

    python bench/serve_load.py --model smollm2-135m-instruct --adapter a=runs/x --adapter b=runs/y \
        [--clients 4] [--requests 40] [--seconds 300] [--max-tokens 32]

Starts the server in its own process on a free port, waits for /health, then runs the load
twice — every request to the first adapter (one adapter), then requests spread round-robin over
the base and every adapter (several) — with the official `openai` client, greedy decoding, and
prints requests/s, generated tokens/s, latency p50/p95/p99 and errors for each. The prompts are
the example task's test rows (examples/extract/test.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up in time")


def load(client, models: list[str], prompts: list[list[dict]], *, clients: int, requests: int,
         seconds: float, max_tokens: int) -> dict:  # fmt: skip
    deadline = time.time() + seconds

    def one(i: int):
        if time.time() > deadline:
            return None
        started = time.perf_counter()
        try:
            r = client.chat.completions.create(model=models[i % len(models)], messages=prompts[i % len(prompts)],
                                               max_tokens=max_tokens, temperature=0)  # fmt: skip
            return time.perf_counter() - started, r.usage.completion_tokens, None
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            return time.perf_counter() - started, 0, type(e).__name__

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for r in pool.map(one, range(requests)) if r is not None]
    wall = time.perf_counter() - started
    ok = [r for r in results if r[2] is None]
    lat = sorted(r[0] for r in ok) or [float("nan")]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 1),
            "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(sum(r[1] for r in ok) / wall, 1),
            "p50_s": round(pct(50), 2), "p95_s": round(pct(95), 2), "p99_s": round(pct(99), 2),
            "error_kinds": sorted({r[2] for r in results if r[2]})}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", action="append", default=[], help="name=RUN_DIR (repeat).")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=300, help="Stop sending after this long.")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "tunelab", "serve", "--model", args.model, "--port", str(port),
           "--max-queue", str(max(16, args.clients * 2))]  # fmt: skip
    for spec in args.adapter:
        cmd += ["--adapter", spec]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        rows = [
            json.loads(x) for x in (ROOT / "examples/extract/test.jsonl").read_text().splitlines()
        ]
        prompts = [r["messages"][:-1] for r in rows]
        names = [s.split("=", 1)[0] for s in args.adapter]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.clients} clients, {args.requests} requests at most, {args.seconds:g} s at most, "
              f"max_tokens {args.max_tokens}, greedy")  # fmt: skip
        runs = [("one adapter", names[:1] or [args.model]), ("several", [args.model, *names])]
        for label, models in runs:
            result = load(client, models, prompts, clients=args.clients, requests=args.requests,
                          seconds=args.seconds, max_tokens=args.max_tokens)  # fmt: skip
            print(f"{label:<12} models {','.join(models)}: {json.dumps(result)}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
