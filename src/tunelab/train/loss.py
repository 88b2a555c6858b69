"""Training objectives as *summed* losses, so gradient accumulation is exact.

An objective says two things about a micro-batch: ``weight(batch)``, its share of the optimizer
step's normaliser, and ``loss_sum(model, batch)``, the weighted loss summed over it. The loop
divides every micro-batch's sum by the total weight of the whole step before ``backward``, so

    step loss = sum over the step's tokens of w_t * NLL_t  /  sum over the step's tokens of w_t

whatever the micro-batch size and number of accumulation steps (RELIABILITY 1 and 2). The loop
knows nothing else about the objective; preference objectives plug in the same way.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.data.collate import Batch


class Objective(Protocol):
    def weight(self, batch: Batch) -> float: ...

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...


def target_weights(batch: Batch) -> torch.Tensor:
    """Weights of the prediction targets: token t is predicted from positions < t."""
    return batch.loss_weights[:, 1:]


def weighted_nll_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_t w_t * NLL(token_t | tokens_<t), computed in fp32 over the weighted targets only.

    ``logits``: [B, T, V]; ``input_ids``, ``weights``: [B, T] (weights[:, 0] is never a target).
    """
    w = weights[:, 1:]
    keep = w > 0
    picked = logits[:, :-1][keep].float()
    targets = input_ids[:, 1:][keep]
    nll = F.cross_entropy(picked, targets, reduction="none")
    return (nll * w[keep]).sum()


def split_head(model: torch.nn.Module):
    """(decoder, output head, logit soft-cap) of a causal LM, PEFT-wrapped or not; None when
    the model does not expose them (then the plain forward is used)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is lm:
        return None
    return decoder, head, getattr(lm.config, "final_logit_softcapping", None)


def chunked_head_nll_sum(hidden, head, softcap, targets, weights, chunk: int) -> torch.Tensor:
    """sum w * NLL over rows of ``hidden`` [N, d], ``chunk`` rows of logits at a time.

    Each chunk's logits are recomputed in the backward pass instead of being kept, so the
    full [N, vocab] fp32 logits never exist (the LM head is most of the memory of a small model).
    """

    def piece(h, t, w):
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return (F.cross_entropy(logits, t, reduction="none") * w).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        args = (hidden[i : i + chunk], targets[i : i + chunk], weights[i : i + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, *args, use_reentrant=False)
        else:
            total = total + piece(*args)
    return total


class SFT:
    """Supervised fine-tuning: weighted next-token NLL (prompt tokens at prompt_loss_weight).

    Logits are computed only for targets with a weight, ``chunk`` rows at a time."""

    def __init__(self, chunk: int = 512):
        self.chunk = chunk

    def weight(self, batch: Batch) -> float:
        return float(target_weights(batch).sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        parts = split_head(model)
        if parts is None:
            return weighted_nll_sum(model(**inputs).logits, batch.input_ids, batch.loss_weights)
        decoder, head, softcap = parts
        hidden = decoder(**inputs).last_hidden_state
        w = batch.loss_weights[:, 1:]
        keep = w > 0
        return chunked_head_nll_sum(
            hidden[:, :-1][keep], head, softcap, batch.input_ids[:, 1:][keep], w[keep], self.chunk
        )


def accumulate(
    model, objective: Objective, batches: list[Batch], autocast=contextlib.nullcontext, scaler=None
) -> float:
    """Forward and backward every micro-batch of one optimizer step; return the step's loss.

    Each micro-batch's summed loss is divided by the weight of the *whole step*, so the
    accumulated gradient equals that of one big batch (RELIABILITY 1)."""
    step_weight = sum(objective.weight(b) for b in batches)
    total = 0.0
    for b in batches:
        with autocast():
            loss = objective.loss_sum(model, b) / step_weight
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
    return total
