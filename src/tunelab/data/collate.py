"""Pad tokenized sequences into a batch of tensors.

``loss_weights[b, t]`` is the weight of token ``t`` *as a prediction target* (the loss shifts:
logits at ``t - 1`` predict token ``t``). Padding has weight 0 and attention mask 0, whatever
its id (the pad id may equal EOS: the EOS that ends a reply keeps its weight of 1).
``position_ids`` restart at 0 for every sequence.

:func:`pack` puts a micro-batch's sequences one after another in a single row, without padding:
``position_ids`` restart at 0 at each sequence, and the batch carries no attention mask
(``packed``), which is how transformers recognises packed rows — each token then attends only
to earlier tokens of its own sequence (the block-diagonal causal mask transformers builds from
the position ids, or a varlen kernel). The first token of each sequence gets weight 0 as a
target: nothing before it in the row may predict it. With ``pad_to`` the row is filled up to a
multiple of it (bf16 on a CPU: fewer kernel shapes) by padding appended to the last sequence —
weight 0, attention mask 0, positions counting on — so no extra document is made: the
sequence's own tokens come first and never see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tunelab.data.tokenize import Encoded

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    loss_weights: torch.Tensor  # float32 [B, T]
    position_ids: torch.Tensor  # int64 [B, T]
    packed: bool = False  # one row of several sequences: run the model without attention_mask
    #: a packed row's documents: cumulative lengths [n + 1] (int32) and the longest — what a
    #: varlen attention (models/varlen.py) runs on
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def model_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: none for a packed row (see the module)."""
        return None if self.packed else self.attention_mask

    def to(self, device) -> Batch:
        tensors = (self.input_ids, self.attention_mask, self.loss_weights, self.position_ids)
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Batch(*(t.to(device, non_blocking=True) for t in tensors), packed=self.packed,
                     cu_seqlens=cu, max_len=self.max_len)  # fmt: skip


def collate(
    seqs: Sequence[Encoded],
    pad_id: int,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> Batch:
    import torch

    if not seqs:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    weights = np.zeros((n, width), dtype=np.float32)
    positions = np.zeros((n, width), dtype=np.int64)
    for i, s in enumerate(seqs):
        length = len(s)
        cols = slice(0, length) if padding_side == "right" else slice(width - length, width)
        ids[i, cols] = s.input_ids
        mask[i, cols] = 1
        weights[i, cols] = s.weights
        positions[i, cols] = np.arange(length)
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        torch.from_numpy(weights),
        torch.from_numpy(positions),
    )


def pack(seqs: Sequence[Encoded], pad_id: int = 0, pad_to: int | None = None) -> Batch:
    """``seqs`` in one row [1, sum of lengths] (rounded up to a multiple of ``pad_to``), each
    attending only to itself (module doc)."""
    import torch

    if not seqs:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(s) for s in seqs]
    real = sum(lengths)
    fill = -real % pad_to if pad_to else 0
    lengths[-1] += fill  # the padding counts as the last sequence's: no document of its own
    ids = np.concatenate([*(np.asarray(s.input_ids, dtype=np.int64) for s in seqs),
                          np.full(fill, pad_id, dtype=np.int64)])  # fmt: skip
    weights = np.concatenate([*(np.asarray(s.weights, dtype=np.float32) for s in seqs),
                              np.zeros(fill, dtype=np.float32)])  # fmt: skip
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    weights[positions == 0] = 0.0  # a sequence's first token is nobody's target
    mask = np.ones(real + fill, dtype=np.int64)
    mask[real:] = 0
    return Batch(
        torch.from_numpy(ids)[None],
        torch.from_numpy(mask)[None],
        torch.from_numpy(weights)[None],
        torch.from_numpy(positions)[None],
        packed=True,
        cu_seqlens=torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32),
        max_len=max(lengths),
    )
