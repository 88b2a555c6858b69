"""The speed benchmark's GPU mode (PERFORMANCE.md's protocol) runs its whole path on a CPU with
the tiny shape, so the first lent GPU spends its minutes measuring, not debugging."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import protocol  # noqa: E402  (bench/protocol.py)


def test_a_conversation_of_n_drawn_tokens_is_n_tokens_and_follows_the_chain():
    tok = protocol.word_tokenizer(4096)
    assert len(tok) == 4096
    rows = protocol.conversations(300, 4096, seed=3)
    lengths = [len(tok.apply_chat_template(r["messages"], return_dict=False)) for r in rows]
    low, high = protocol.LENGTHS["alpaca"][2:]
    assert min(lengths) >= low and max(lengths) <= high
    assert 110 <= sorted(lengths)[150] <= 170  # the median near 140
    words = [w for r in rows for m in r["messages"] for w in m["content"].split()]
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(words)
    assert sum(lengths) == len(words) + protocol.OVERHEAD * len(rows)  # a word is a token
    # low entropy: each word is followed by at most len(SUCCESSORS) distinct words
    following: dict[str, set] = {}
    for a, b in zip(words, words[1:], strict=False):
        following.setdefault(a, set()).add(b)
    assert max(len(v) for v in following.values()) <= len(protocol.SUCCESSORS)
    assert protocol.conversations(300, 4096, seed=3) == rows  # seeded


def test_gpu_mode_runs_on_a_cpu_with_the_tiny_shape(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "bench/train_speed.py", "--shape", "tiny", "--steps", "2", "--warmup", "1",
         "--contenders", "tunelab,hf", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches of tunelab: identical to the plan" in proc.stdout
    parity = next(line for line in proc.stdout.splitlines() if "loss parity tunelab vs hf" in line)
    first = float(parity.split("first step |Δ|/loss ")[1].split(";")[0])
    assert first < 1e-4, parity  # the same weights, batches and objective on both sides
    results = json.loads(out.read_text())["results"]
    assert [len(results[n]["seconds"]) for n in ("tunelab", "hf")] == [3, 3]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| contender"))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| tunelab |"))
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert float(cells[" whole run s "]) == round(sum(results["tunelab"]["seconds"]), 1)
    rounds = json.loads(out.read_text())["rounds"]  # each contender once a round
    ratios = [r["tunelab"] / r["hf"] for r in rounds]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("× hf round by round"))
    assert line == (f"× hf round by round: tunelab {ratios[0]:.2f}, {ratios[1]:.2f} "
                    f"(median {statistics.median(ratios):.2f})")  # fmt: skip
