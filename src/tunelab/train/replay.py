"""Replay: keep what the model knew (``data.replay``, ``data.replay_ratio``; docs/forgetting.md).

A share of every optimizer step's sequences comes from a replay pool; the task examples fill
the rest (the step plan, train/batches.py, decides which, from the seed alone). The pool is

    FILE    any dataset in a supported format, read and tokenized while planning, like the
            training data (a bad record is refused before any weights load);
    self    self-rehearsal: the base model's own answers to general prompts shipped with the
            package (data/rehearsal_prompts.txt, disjoint from the forgetting check's
            questions), generated once before the first step by the workflow
            (workflow/rehearse.py) into the run folder's ``rehearsal.jsonl`` — reused on resume —
            and attached the same way.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from tunelab.config.schema import Config
from tunelab.data.pipeline import load_examples, tokenize_examples
from tunelab.errors import ConfigError, DataError, Problem

REHEARSAL_FILE = "rehearsal.jsonl"  # self-rehearsal's prompts and the base model's answers


def replay_per_step(cfg: Config) -> int:
    """How many of each step's sequences come from the replay pool (0 without data.replay)."""
    if not cfg.data.replay:
        return 0
    return whole_share(cfg, cfg.data.replay_ratio, "data.replay_ratio")


def whole_share(cfg: Config, ratio: float, field: str) -> int:
    """``ratio`` of a step's sequences, in whole sequences, leaving one at least for the task;
    a ratio that rounds to none is refused, naming ``field``."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    k = min(round(ratio * per_step), per_step - 1)
    if k < 1:
        raise ConfigError(
            f"{field}: {ratio} of the {per_step} sequences of a step (train.micro_batch_size x "
            f"train.grad_accum) rounds to none; use at least {1 / per_step:.3g}"
        )
    return k


def pool_prompts() -> list[str]:
    """The package's general prompts for self-rehearsal, one per line."""
    text = resources.files("tunelab.data").joinpath("rehearsal_prompts.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def rehearsal_prompts(seed: int, count: int, pool: list[str] | None = None) -> list[str]:
    """``count`` (at most all) of the package's prompts (``pool``: already read), in a seeded
    order (a short run uses the first few)."""
    prompts = list(pool if pool is not None else pool_prompts())
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def check_replay(cfg: Config, objective) -> None:
    """Refuse what cannot hold, before anything is read."""
    replay = cfg.data.replay
    if not replay:
        return
    if not objective.can_pack:  # an SFT objective: replay rows are conversations
        raise ConfigError(f"data.replay works with train.objective=sft ({objective.name} trains on "
                          "pairs); remove it")  # fmt: skip
    if replay == "self" and cfg.train.distributed == "fsdp":
        raise ConfigError("data.replay: self generates with the model in one piece; with "
                          "train.distributed=fsdp use a replay file, or train.distributed=ddp")  # fmt: skip
    if replay != "self" and not Path(replay).is_file():
        raise DataError(Problem(replay, None, None, "data.replay: file not found (a dataset, or "
                                                    "'self' for self-rehearsal)"))  # fmt: skip


def read_pool(path: Path, cfg: Config, tokenizer, *, chat: bool = False) -> list:
    """The replay pool's tokenized examples (the training data's settings; ``chat``: the
    rehearsal file, always chat records)."""
    data = cfg.data.model_copy(update={"format": "chat", "columns": {}}) if chat else cfg.data
    pool = tokenize_examples(load_examples(path, data), tokenizer, data).examples
    if not pool:
        raise DataError(Problem(str(path), None, None, "data.replay: no usable example (all "
                                                       "longer than data.max_seq_len?)"))  # fmt: skip
    return pool


def attach(train: list, steps, pool: list) -> None:
    """Put the pool after the task examples: the step plan draws indices from it."""
    if steps.replay:
        raise ValueError("a replay pool is attached already")
    train.extend(pool)
    steps.lengths.extend(len(x.seq) for x in pool)
    steps.replay = len(pool)


def plan_replay(
    cfg: Config, tokenizer, train: list, steps, total_steps: int
) -> tuple[str, list[str]]:
    """(what the plan says of the replay, self-rehearsal's prompts). A file's pool is attached
    now; self-rehearsal's after the base model has answered (workflow/rehearse.py)."""
    k, replay = steps.replay_per_step, cfg.data.replay
    if not k:
        return "", []
    share = f"{k} of {steps.mbs * steps.ga} sequences a step"
    if replay != "self":
        pool = read_pool(Path(replay), cfg, tokenizer)
        attach(train, steps, pool)
        return f"{replay}: {len(pool)} examples; {share}", []
    pool = pool_prompts()
    prompts = rehearsal_prompts(cfg.data.seed, total_steps * k, pool)
    return (f"self-rehearsal: the base model's answers to {len(prompts)} of the package's "
            f"{len(pool)} general prompts (generated before the first step, kept in "
            f"{REHEARSAL_FILE}); {share}"), prompts  # fmt: skip
