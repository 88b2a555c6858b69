"""Pad tokenized sequences into a batch of tensors.

``loss_weights[b, t]`` is the weight of token ``t`` *as a prediction target* (the loss shifts:
logits at ``t - 1`` predict token ``t``). Padding has weight 0 and attention mask 0, whatever
its id (the pad id may equal EOS: the EOS that ends a reply keeps its weight of 1).
``position_ids`` restart at 0 for every sequence, which is also the shape a packed batch
(several documents in one row) will use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.data.tokenize import Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    loss_weights: torch.Tensor  # float32 [B, T]
    position_ids: torch.Tensor  # int64 [B, T]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def collate(
    seqs: Sequence[Encoded],
    pad_id: int,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> Batch:
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
