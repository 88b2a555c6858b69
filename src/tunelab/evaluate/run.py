"""One evaluation: a model (or a run's fine-tune) answers a held-out set; we score the answers.

target -> model + tokenizer     (a run folder: its base model + adapter, merged; or any model)
examples -> conversations       (the prompt turns, after k shots when asked)
generate -> predictions -> scores (+ loss/perplexity on the references, + judge)
-> eval/<name>/predictions.jsonl, metrics.json  (written atomically)
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from tunelab.config.schema import DataConfig, EvalConfig, ModelConfig
from tunelab.data.collate import collate
from tunelab.data.records import Example, Message
from tunelab.data.split import normalize
from tunelab.data.tokenize import EncodeOptions, encode
from tunelab.errors import ConfigError, DataError, Problem
from tunelab.evaluate.generate import GenerationOptions, generate
from tunelab.files import atomic_folder, file_sha256, jsonl_text
from tunelab.models.nll import causal_lm_nll_sum, perplexity, target_weights
from tunelab.models.run_folder import LoadedModel, load_run
from tunelab.models.tokenizer import pad_id

CONVERSATION_FORMATS = ("alpaca", "chat", "kto")


Target = LoadedModel  # what an evaluation runs: a model, its tokenizer and a label


def load_target(target: str, model_cfg: ModelConfig | None = None) -> Target:
    """A run folder (its final adapter on its base model, merged) or a model name/folder/file,
    placed by ``model_cfg`` (default: the run's own model settings, else auto)."""
    return load_run(target, model_cfg)


def load_eval_examples(
    path: str | Path, data_cfg: DataConfig | None = None, limit: int | None = None
) -> list[Example]:
    from tunelab.data.pipeline import load_examples

    examples = load_examples(path, data_cfg or DataConfig())
    check_conversations(examples)
    return examples[:limit] if limit else examples


def check_conversations(examples: Sequence[Example]) -> None:
    """A :class:`~tunelab.errors.DataError` at the first record generation cannot evaluate
    (one that is not a prompt with a reference answer)."""
    bad = [e for e in examples if e.format not in CONVERSATION_FORMATS]
    if bad:
        e = bad[0]
        raise DataError(
            Problem(e.source.file, e.source.line, None,
                    f"a {e.format} record cannot be evaluated by generation "
                    f"(expected one of: {', '.join(CONVERSATION_FORMATS)}: a prompt and a reference answer)")
        )  # fmt: skip


def pick_shots(
    pool: Sequence[Example], k: int, seed: int, test: Sequence[Example]
) -> list[Example]:
    """k demonstration examples from ``pool`` (the training split), never one whose prompt
    appears in the test set; the same k for every test example, chosen by ``seed``."""
    if k == 0:
        return []
    test_prompts = {normalize(e.prompt_key) for e in test}
    usable = [
        e
        for e in pool
        if e.format in CONVERSATION_FORMATS and normalize(e.prompt_key) not in test_prompts
    ]
    if len(usable) < k:
        raise DataError(
            Problem(pool[0].source.file if pool else "shots", None, None,
                    f"{k} shots asked, but only {len(usable)} training examples are usable (not in the test set)")
        )  # fmt: skip
    return random.Random(seed).sample(usable, k)


def conversation(
    example: Example, shots: Sequence[Example], instruction: str | None
) -> list[Message]:
    """The prompt turns for ``example``: system (+ instruction), then each shot as a user/assistant
    pair, then the example's own turns up to its last user message."""
    own = example.messages[:-1]
    system = [m for m in own if m.role == "system"]
    rest = [m for m in own if m.role != "system"]
    sys_text = "\n\n".join([m.content for m in system] + ([instruction] if instruction else []))
    msgs = [Message("system", sys_text)] if sys_text else []
    for shot in shots:
        turns = [m for m in shot.messages if m.role != "system"]
        msgs += [Message("user", turns[-2].content), Message("assistant", turns[-1].content)]
    return msgs + rest


def prompt_hash(example: Example) -> str:
    """16 hex digits of SHA-256 over the example's own turns before its reply (roles and
    contents, system included; no shots, no ``eval.instruction``): what ``tunelab compare``
    aligns evaluations by, so the test file's path and position do not matter. A preference
    pair's turns are its prompt (its messages hold no reply)."""
    own = example.messages if example.format == "preference" else example.messages[:-1]
    turns = [[m.role, m.content] for m in own]
    text = json.dumps(turns, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def reference_loss(
    target: Target, prompts: list[list[Message]], references: list[str], batch_size: int
) -> float | None:
    """Loss per reference token given each prompt (how confident the model is in the reference —
    not whether its own answer is right)."""
    from tunelab.data.read import Source

    examples = [
        Example(Source("eval", i), "chat", p + [Message("assistant", r)])
        for i, (p, r) in enumerate(zip(prompts, references, strict=True))
    ]
    report = encode(examples, target.tokenizer, EncodeOptions(prompt_loss_weight=0.0))
    device = next(target.model.parameters()).device
    pad = pad_id(target.tokenizer)
    total = weight = 0.0
    with torch.no_grad():
        for i in range(0, len(report.examples), batch_size):
            b = collate([t.seq for t in report.examples[i : i + batch_size]], pad).to(device)
            loss = causal_lm_nll_sum(
                target.model, b.input_ids, b.attention_mask, b.position_ids, b.loss_weights
            )
            total += float(loss)
            weight += float(target_weights(b.loss_weights).sum())
    return total / weight if weight else None


def evaluate_examples(
    target: Target,
    examples: Sequence[Example],
    ecfg: EvalConfig,
    out_dir: Path,
    *,
    name: str,
    data_label: str,
    shots: Sequence[Example] = (),
    instruction: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    judge=None,
    spread: Spread | None = None,
) -> dict | None:
    """Generate, score and write ``out_dir/name/{predictions.jsonl, metrics.json}``. With
    ``spread`` (several processes) each generates its share of the examples and the first
    gathers them, scores and writes; the others return None."""
    from tunelab.evaluate.metrics import load_user_metric, score_all

    user_metric = load_user_metric(ecfg.metric) if ecfg.metric else None  # fail before generating
    started = time.perf_counter()
    prompts = [conversation(e, shots, instruction) for e in examples]
    references = [e.response for e in examples]
    as_dicts = [[{"role": m.role, "content": m.content} for m in p] for p in prompts]
    options = GenerationOptions(
        max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size, do_sample=ecfg.do_sample,
        temperature=ecfg.temperature, top_p=ecfg.top_p,
    )  # fmt: skip
    predictions = generate_shared(target, as_dicts, options, on_progress, spread)
    if predictions is None:
        return None
    gen_seconds = time.perf_counter() - started
    records = [
        {
            "index": i,
            "source": str(e.source),
            "prompt": e.instruction,
            "prompt_hash": prompt_hash(e),
            "reference": ref,
            "prediction": pred,
        }
        for i, (e, ref, pred) in enumerate(zip(examples, references, predictions, strict=True))
    ]
    names = list(ecfg.metrics) + (["task"] if user_metric else [])
    per_example, summary = score_all(
        predictions,
        references,
        records,
        names=names,
        normalize=ecfg.normalize,
        user_metric=user_metric,
    )
    loss = reference_loss(target, prompts, references, ecfg.batch_size)
    summary["loss"] = loss
    summary["perplexity"] = perplexity(loss)
    judge_failures: list[str] = []
    if judge is not None:
        from tunelab.evaluate.judge import judge_all, summarize_judge

        scores, judge_failures = judge_all(
            judge, [(r["prompt"], r["reference"], r["prediction"]) for r in records]
        )
        per_example["judge"] = scores
        summary.update(
            {
                f"judge_{k}" if k != "mean" else "judge": v
                for k, v in summarize_judge(scores).items()
            }
        )
    for i, r in enumerate(records):
        r["scores"] = {
            k: v[i]
            for k, v in per_example.items()
            if isinstance(v, list) and len(v) == len(records)
        }
    meta = {
        "name": name, "model": target.label, "adapter": target.adapter, "data": data_label,
        "data_sha256": file_sha256(data_label) if Path(data_label).is_file() else None,
        "metric": ecfg.metric,
        "shots": len(shots), "shot_sources": [str(s.source) for s in shots], "instruction": instruction,
        "examples": len(records), "metrics": summary, "judge_failures": judge_failures,
        "generation": options.__dict__, "seconds": round(time.perf_counter() - started, 1),
        "generation_seconds": round(gen_seconds, 1),
    }  # fmt: skip
    write_evaluation(out_dir / name, records, meta)
    return meta


class Spread(Protocol):
    """Several processes sharing an evaluation (``tunelab.train.distributed.World``)."""

    @property
    def several(self) -> bool: ...

    @property
    def main(self) -> bool: ...

    def part(self, items: list) -> list: ...

    def gather(self, obj) -> list: ...


def generate_shared(target: Target, conversations: list, options, on_progress=None,
                    spread: Spread | None = None, *, everywhere: bool = False):  # fmt: skip
    """Every reply — or, with ``spread``, this process's share generated and every share
    gathered on the first process (the others get None; ``everywhere``: every process gets
    them all)."""
    if spread is None or not spread.several:
        return generate(target.model, target.tokenizer, conversations, options, on_progress)
    mine = spread.part(list(range(len(conversations))))
    replies = generate(target.model, target.tokenizer, [conversations[i] for i in mine], options,
                       on_progress if spread.main else None)  # fmt: skip
    shares = spread.gather(list(zip(mine, replies, strict=True)))
    if not spread.main and not everywhere:
        return None
    out = [""] * len(conversations)
    for share in shares:
        for i, reply in share:
            out[i] = reply
    return out


def write_evaluation(folder: Path, records: list[dict], meta: dict) -> None:
    """``folder/predictions.jsonl`` and ``folder/metrics.json``, all or nothing (the folder is
    written aside and renamed into place)."""
    with atomic_folder(folder) as tmp:
        (tmp / "predictions.jsonl").write_text(jsonl_text(records), encoding="utf-8")
        (tmp / "metrics.json").write_text(
            json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8"
        )


def metric_failure_lines(meta: dict, shown: int = 3) -> list[str]:
    """What to tell the user when their metric (``eval.metric``) failed on some examples: the
    count and the first ``shown`` messages; empty when it never failed."""
    failed = meta["metrics"].get("task_failed") or 0
    if not failed:
        return []
    messages = meta["metrics"].get("task_failures") or []
    spec = f" {meta['metric']}" if meta.get("metric") else ""
    lines = [
        f"{meta['name']}: your metric{spec} failed on {failed} of {meta['examples']} examples "
        "(their task score is null):"
    ]
    lines += [f"  {m}" for m in messages[:shown]]
    if failed > min(shown, len(messages)):
        lines.append(f"  ... and {failed - min(shown, len(messages))} more (task_failures in metrics.json lists {len(messages)})")  # fmt: skip
    return lines


def check_metric_ran(meta: dict, folder: Path) -> None:
    """A :class:`~tunelab.errors.ConfigError` when the user's metric failed on every example
    (the function is broken: its mean is no number at all). Call it after the evaluation is
    written, so the predictions and the failure messages can be read."""
    failed, n = meta["metrics"].get("task_failed") or 0, meta["examples"]
    if n and failed >= n:
        first = (meta["metrics"].get("task_failures") or ["?"])[0]
        raise ConfigError(
            f"eval.metric {meta.get('metric')!r} failed on every example ({failed} of {n}), e.g. "
            f"{first}; the evaluation is written to {folder} (task scores are null, "
            "the other metrics are kept): fix the function and evaluate again"
        )
