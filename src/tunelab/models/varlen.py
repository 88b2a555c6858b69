"""Attention over packed rows by document: no token attends across a sequence boundary and no
work is spent on the pairs a block-diagonal mask would throw away.

A packed row (``data/collate.py::pack``) holds several sequences end to end. Through eager or
SDPA attention, transformers builds a dense [T, T] block-diagonal mask from the position ids
and computes every pair, so a row of four 100-token sequences costs 400² where the sequences
need 4 × 100². :func:`varlen_attention` — registered with transformers as :data:`NAME` —
takes the documents' boundaries (``cu_seq_lens_q``, the cumulative lengths the batch carries)
and computes each document's causal attention alone:

- on a GPU in half precision, one call of torch's flash-attention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``) over the whole row;
- elsewhere (a CPU, fp32), SDPA per document — the same numbers, the reference the kernel is
  tested against.

transformers builds no mask for an attention it does not know, so the row reaches here with
``attention_mask=None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch


NAME = "tunelab_varlen"


def documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths [n + 1] int32, longest) of the documents of one packed row, found
    where ``position_ids`` [1, T] restart at 0."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    ends = torch.cat([starts, starts.new_tensor([pos.numel()])])
    lengths = ends[1:] - ends[:-1]
    return ends.to(torch.int32), int(lengths.max()) if lengths.numel() else 0


def kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch's flash varlen kernel can run on ``device`` in ``dtype``."""
    import torch

    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):  # fmt: skip
    """transformers' attention interface: ``query`` [1, H, T, D], ``key``/``value``
    [1, H_kv, T, D] of one packed row; returns ([1, T, H, D], None)."""
    import torch

    if query.shape[0] != 1:
        raise ValueError(f"{NAME} takes one packed row, got a batch of {query.shape[0]}")
    if cu_seq_lens_q is None:  # not handed down: found from the position ids
        cu_seq_lens_q, max_length_q = documents(position_ids)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    if kernel_available(q.device, q.dtype):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_length_q,
                          max_length_q, scale=scaling, window_size=(-1, 0),
                          enable_gqa=k.shape[1] != q.shape[1])  # fmt: skip
    else:
        out = _by_document(query, key, value, cu_seq_lens_q.tolist(), scaling)
    return out[None], None


def _by_document(query, key, value, bounds: list[int], scaling) -> torch.Tensor:
    """Causal SDPA over each document of the row alone; [T, H, D]."""
    import torch
    import torch.nn.functional as F

    gqa = key.shape[1] != query.shape[1]
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]  # fmt: skip
    return torch.cat(parts, dim=2)[0].transpose(0, 1)


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers' models can use."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
