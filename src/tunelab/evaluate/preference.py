"""Preference accuracy: which answer of a held-out pair the model finds more likely.

    pairs.jsonl ({"prompt", "chosen", "rejected"}) -> load_eval_data (every record a pair)
    -> encode (chat template, as training does) -> chosen and rejected of a batch in one
    forward, no gradient -> log p(answer | prompt) summed over the answer's tokens
    -> per-pair scores -> eval/<name>/{predictions.jsonl, metrics.json}  (written atomically)

Nothing is generated. For each pair the model scores both answers given the prompt (rendered
through the chat template exactly as training renders it): ``log p(answer | prompt)`` is the
sum of the log-probabilities of the answer's tokens — the reply and the special token that
closes it (EOS / end-of-turn); the prompt, the template around it and any earlier assistant
turn of a multi-turn prompt are never scored. Two right-or-wrong scores per pair:

``preference_accuracy`` (the headline)
    1 when the chosen answer's *mean* log-probability per token is higher than the rejected
    one's, else 0. Length-normalised: in most preference data the chosen answer is longer, and
    a longer answer has a lower summed log-probability just because it has more tokens, so the
    summed comparison is biased towards the shorter answer whatever the model learned.
``preference_accuracy_sum``
    1 when the chosen answer's *summed* log-probability is higher. This is what DPO's implicit
    reward compares (``β · log π/π_ref`` of whole answers; against a reference model the
    length terms mostly cancel, here they do not), so it moves most directly under DPO, and it
    carries the length bias above: on pairs whose chosen answer is longer it can be low for a
    model that prefers the chosen answer token by token.

A tie (equal values) scores 0 in either metric: neither answer is preferred. Swapping chosen and
rejected turns every score s of a pair without a tie into 1 − s.

``predictions.jsonl`` has one record per pair, shaped like a generation evaluation's so that
``tunelab compare`` aligns and compares them unchanged: ``index``, ``source`` (file:line),
``prompt`` (the last user message), ``prompt_hash`` (the pair's prompt turns,
:func:`tunelab.evaluate.run.prompt_hash`), ``reference`` (the chosen answer), ``rejected``,
``prediction`` (the answer the model prefers on the headline metric: the chosen text when
``preference_accuracy`` is 1, else the rejected text), ``logp_chosen``, ``logp_rejected``
(summed log-probabilities, natural log), ``tokens_chosen``, ``tokens_rejected`` (answer
tokens, closing token included) and ``scores`` (the two metrics, 0.0 or 1.0).

``metrics.json`` has ``kind: "preference"`` and, under ``metrics``: both accuracies, each with
``<name>_ci95`` = ``[lo, hi]`` (the percentile bootstrap of the mean over pairs, 10,000
resamples, seed 0: the same bootstrap ``tunelab compare`` uses for differences);
``chosen_logp_per_token`` and ``rejected_logp_per_token`` (the mean over pairs of each answer's
mean log-probability per token: whether training raised the chosen answers or only lowered the
rejected ones), ``margin_sum`` (the mean of ``logp_chosen − logp_rejected``) and ``ties``
(pairs tied on the headline metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config.schema import DataConfig, EvalConfig
from tunelab.data.collate import collate
from tunelab.data.records import Example
from tunelab.data.render import ensure_chat_template
from tunelab.data.tokenize import EncodeOptions, TokenizedExample, encode
from tunelab.errors import DataError, Problem
from tunelab.evaluate.run import Target, check_conversations, prompt_hash, write_evaluation
from tunelab.files import file_sha256
from tunelab.models.nll import token_logps
from tunelab.models.tokenizer import pad_id

#: The per-pair scores, headline first.
PAIR_METRICS = ("preference_accuracy", "preference_accuracy_sum")


@dataclass(frozen=True)
class PairLogps:
    """One pair as the model sees it: each answer's summed log-probability and token count."""

    logp_chosen: float
    logp_rejected: float
    tokens_chosen: int
    tokens_rejected: int

    @property
    def per_token(self) -> tuple[float, float]:
        return self.logp_chosen / self.tokens_chosen, self.logp_rejected / self.tokens_rejected

    @property
    def scores(self) -> dict[str, float]:
        chosen, rejected = self.per_token
        return {
            "preference_accuracy": float(chosen > rejected),
            "preference_accuracy_sum": float(self.logp_chosen > self.logp_rejected),
        }


def load_eval_data(
    path: str | Path, data_cfg: DataConfig | None = None, limit: int | None = None
) -> tuple[bool, list[Example]]:
    """``(True, pairs)`` for a file of preference pairs, ``(False, conversations)`` for a file
    generation evaluates (other formats refused as by
    :func:`~tunelab.evaluate.run.load_eval_examples`). A file mixing pairs and other records
    is a :class:`~tunelab.errors.DataError`, before any weight is read, naming by file and line
    each record that is not of the first record's kind."""
    from tunelab.data.pipeline import load_examples

    examples = load_examples(path, data_cfg or DataConfig())
    pairs = any(e.format == "preference" for e in examples)
    if pairs:
        check_pairs(examples)
    else:
        check_conversations(examples)
    return pairs, examples[:limit] if limit else examples


def check_pairs(examples: Sequence[Example]) -> None:
    """Every record is a preference pair, or every record is not: a file is evaluated one way.
    The first record decides which; the others are named."""
    if not examples:
        return
    first = examples[0]
    want_pairs = first.format == "preference"
    odd = [e for e in examples if (e.format == "preference") != want_pairs]
    if not odd:
        return
    what = "a preference pair" if want_pairs else f"a {first.format} record"
    problems = [
        Problem(e.source.file, e.source.line, "format",
                f"a {e.format} record, but the file starts with {what} (line {first.source.line}): "
                "an evaluation file holds either preference pairs (prompt, chosen, rejected: "
                "scored by log-probability) or conversations (answered by generation), not both")
        for e in odd
    ]  # fmt: skip
    raise DataError(problems[:20], total=len(problems), cap=20)


def encode_pairs(examples: Sequence[Example], tokenizer) -> list[TokenizedExample]:
    """Each pair tokenized as training tokenizes it: ``.seq`` = prompt + chosen and
    ``.rejected`` = prompt + rejected, their ``response`` masks on the answer and its
    closing token (the tokenizer scores only a pair's final reply: earlier assistant turns of
    its prompt are prompt)."""
    report = encode(list(examples), tokenizer, EncodeOptions(prompt_loss_weight=0.0))
    if len(report.examples) != len(examples):  # no truncation here: nothing should be dropped
        reasons = "; ".join(f"{n} {why}" for why, n in report.dropped.most_common())
        raise DataError(Problem(examples[0].source.file, None, None, f"pairs cannot be scored: {reasons}"))  # fmt: skip
    return report.examples


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[PairLogps]:
    """Summed log-probability and token count of each pair's two answers, ``batch_size`` pairs
    per forward pass (the chosen rows, then the rejected ones), in eval mode, without gradient."""
    tokenized = encode_pairs(examples, tokenizer)
    order = sorted(range(len(tokenized)), key=lambda i: -max(len(tokenized[i].seq), len(tokenized[i].rejected)))  # fmt: skip
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out: list[PairLogps | None] = [None] * len(tokenized)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [tokenized[i].seq for i in idx] + [tokenized[i].rejected for i in idx]
            batch = collate(seqs, pad)
            answer = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
            for row, s in enumerate(seqs):
                answer[row, : len(s)] = torch.from_numpy(s.response)
            b = batch.to(device)
            per_token = token_logps(model, b.input_ids, b.attention_mask, b.position_ids, answer.to(device))  # fmt: skip
            logps = per_token.double().sum(-1).cpu().tolist()
            counts = answer[:, 1:].sum(-1).tolist()  # targets: token t is predicted from < t
            n = len(idx)
            for row, i in enumerate(idx):
                out[i] = PairLogps(logps[row], logps[n + row], counts[row], counts[n + row])
            if on_progress:
                on_progress(n)
    finally:
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the percentile bootstrap interval of the mean (10,000 resamples,
    seed 0), the bootstrap ``tunelab compare`` uses for differences."""
    from tunelab.evaluate.compare import paired_bootstrap

    return paired_bootstrap(np.zeros(len(values)), values, confidence=confidence)


def summarize(scored: Sequence[PairLogps]) -> dict:
    """The metrics of metrics.json (see the module docstring)."""
    summary: dict = {}
    for name in PAIR_METRICS:
        mean, lo, hi = mean_interval([p.scores[name] for p in scored])
        summary[name] = mean
        summary[f"{name}_ci95"] = [lo, hi]
    per_token = np.array([p.per_token for p in scored], dtype=float)
    summary["chosen_logp_per_token"] = float(per_token[:, 0].mean())
    summary["rejected_logp_per_token"] = float(per_token[:, 1].mean())
    summary["margin_sum"] = float(np.mean([p.logp_chosen - p.logp_rejected for p in scored]))
    summary["ties"] = int((per_token[:, 0] == per_token[:, 1]).sum())
    return summary


def pair_record(index: int, example: Example, p: PairLogps) -> dict:
    scores = p.scores
    preferred = example.chosen if scores["preference_accuracy"] == 1.0 else example.rejected
    return {
        "index": index, "source": str(example.source), "prompt": example.instruction,
        "prompt_hash": prompt_hash(example), "reference": example.chosen,
        "rejected": example.rejected, "prediction": preferred,
        "logp_chosen": p.logp_chosen, "logp_rejected": p.logp_rejected,
        "tokens_chosen": p.tokens_chosen, "tokens_rejected": p.tokens_rejected, "scores": scores,
    }  # fmt: skip


def evaluate_pairs(
    target: Target,
    examples: Sequence[Example],
    ecfg: EvalConfig,
    out_dir: Path,
    *,
    name: str,
    data_label: str,
    data_cfg: DataConfig | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Score every pair and write ``out_dir/name/{predictions.jsonl, metrics.json}``."""
    if not examples:
        raise DataError(Problem(data_label, None, None, "no preference pair to evaluate"))
    started = time.perf_counter()
    template = ensure_chat_template(target.tokenizer, (data_cfg or DataConfig()).chat_template)
    scored = score_pairs(target.model, target.tokenizer, examples, ecfg.batch_size, on_progress)
    records = [pair_record(i, e, p) for i, (e, p) in enumerate(zip(examples, scored, strict=True))]
    meta = {
        "name": name, "kind": "preference", "model": target.label, "adapter": target.adapter,
        "data": data_label,
        "data_sha256": file_sha256(data_label) if Path(data_label).is_file() else None,
        "metric": None, "shots": 0, "examples": len(records), "metrics": summarize(scored),
        "chat_template": template, "batch_size": ecfg.batch_size,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    write_evaluation(out_dir / name, records, meta)
    return meta
