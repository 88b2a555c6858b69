"""Guards around a training step: non-finite losses and out-of-memory errors."""

from __future__ import annotations

import math

from tunelab.errors import TunelabError


class TrainingStopped(TunelabError):
    """The run stopped on purpose (NaN guard with action 'stop', too many skips)."""


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def out_of_memory_message(cfg, method, where: str) -> str:
    """What to change after running out of memory: the common remedies, then the method's own.
    While the weights load, only what shrinks the weights helps."""
    t, m = cfg.train, cfg.model
    tips = []
    if where != "model load":
        if t.micro_batch_tokens == "auto":  # every forward as wide as the widest
            tips.append("no token budget (train.micro_batch_tokens=null: micro_batch_size rows)")
        elif t.micro_batch_tokens:  # the budget, not micro_batch_size, sizes the forwards
            tips.append(f"a smaller token budget (train.micro_batch_tokens="
                        f"{max(1, t.micro_batch_tokens // 2)}, or null: micro_batch_size rows)")  # fmt: skip
        tips += [
            f"a smaller micro-batch (train.micro_batch_size={max(1, t.micro_batch_size // 2)}, "
            f"train.grad_accum={t.grad_accum * 2} keeps the same effective batch)",
            f"shorter sequences (data.max_seq_len={max(64, cfg.data.max_seq_len // 2)})",
        ]
        if not m.gradient_checkpointing:
            tips.append("gradient checkpointing (model.gradient_checkpointing=true, ~20% slower)")
    elif m.precision in ("auto", "fp32") and not method.trains_base:
        tips.append("a half-precision base (model.precision=bf16)")
    tips += method.memory_advice()
    if where == "model load":
        tips.append("a smaller model")
    return (
        f"out of memory during {where}. Try: "
        + "; ".join(tips)
        + ". The last checkpoint is intact."
    )


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
