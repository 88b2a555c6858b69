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
- on a CPU, the row's tokens gathered into a padded [documents, width] batch
  (:class:`Gathered`, made once a forward by :func:`attention_inputs`), the grouped matmul
  attention of ``models/attention.py`` over it with a causal mask per document, and the
  result put back in row order: the linear layers around it see no padding at all, only the
  attention does — as much as a padded batch of the same sequences (rows longer than
  :data:`~tunelab.models.device.MATMUL_MAX_LEN` run SDPA per document instead);
- elsewhere (fp32 on a GPU without the kernel), SDPA per document — the same numbers, the
  reference both are tested against.

transformers builds no mask for an attention it does not know, so the row reaches here with
``attention_mask=None``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

from tunelab.models.device import MATMUL_MAX_LEN

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


#: a gathered batch's width is a multiple of this (bf16 on a CPU: fewer kernel shapes)
GATHER_WIDTH = 32


class Gathered(NamedTuple):
    """Where a packed row's T tokens sit in a padded batch of its B documents, W wide."""

    slots: torch.Tensor  # [B * W] int64: each slot's token (padding: its document's first)
    back: torch.Tensor  # [T] int64: each token's slot
    allowed: torch.Tensor  # [B, 1, W, W] bool: causal within the document, its real keys only
    owners: torch.Tensor  # [B * W] int64: the token each slot holds, T for a padding slot
    biases: dict  # (window, dtype) -> additive [B, 1, W, W] mask, made by the first layer

    @property
    def width(self) -> int:
        return self.allowed.shape[-1]


def gathered(cu_seqlens: torch.Tensor) -> Gathered:
    """The :class:`Gathered` layout of a packed row whose documents end at ``cu_seqlens``. A
    padding query row may see its document's every key, so no row of the softmax is empty
    (its output is never put back, and its gradient is zero)."""
    import numpy as np
    import torch

    bounds = cu_seqlens.cpu().numpy().astype(np.int64)
    starts, lengths = bounds[:-1], np.diff(bounds)
    width = -(-int(lengths.max()) // GATHER_WIDTH) * GATHER_WIDTH
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]  # [B, W]
    slots = np.where(real, starts[:, None] + cols[None, :], starts[:, None])
    doc = np.repeat(np.arange(len(lengths)), lengths)
    back = doc * width + np.arange(bounds[-1]) - starts[doc]
    allowed = np.tril(np.ones((width, width), dtype=bool))[None] & real[:, None, :]
    owners = np.where(real, slots, bounds[-1]).reshape(-1)
    return Gathered(torch.from_numpy(slots.reshape(-1)), torch.from_numpy(back),
                    torch.from_numpy(allowed[:, None]), torch.from_numpy(owners), {})  # fmt: skip


def attention_inputs(cu_seqlens: torch.Tensor, longest: int, device) -> dict:
    """The keyword arguments a packed row's forward hands down to :func:`varlen_attention`: the
    documents' bounds (transformers' names) and, on a CPU, their :class:`Gathered` layout —
    made once for all the layers."""
    import torch

    inputs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest,
                  max_length_k=longest)  # fmt: skip
    if torch.device(device).type == "cpu":
        inputs["tunelab_layout"] = gathered(cu_seqlens)
    return inputs


def by_document(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether packed rows run each document's attention alone on ``device`` and cost only their
    real tokens: with the flash varlen kernel on a GPU, with the gathered matmuls on a CPU."""
    import torch

    return torch.device(device).type == "cpu" or kernel_available(device, dtype)


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
                     cu_seq_lens_q=None, max_length_q=None, position_ids=None,
                     tunelab_layout=None, sliding_window=None, **kwargs):  # fmt: skip
    """transformers' attention interface: ``query`` [1, H, T, D], ``key``/``value``
    [1, H_kv, T, D] of one packed row; returns ([1, T, H, D], None). ``sliding_window``
    (a local layer's, transformers' meaning): a query sees the keys fewer than that many
    tokens back, itself included."""
    import torch

    if query.shape[0] != 1:
        raise ValueError(f"{NAME} takes one packed row, got a batch of {query.shape[0]}")
    if cu_seq_lens_q is None:  # not handed down: found from the position ids
        cu_seq_lens_q, max_length_q = documents(position_ids)
    window = sliding_window if sliding_window and sliding_window < max_length_q else None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    if kernel_available(q.device, q.dtype):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_length_q,
                          max_length_q, scale=scaling, window_size=((window or 0) - 1, 0),
                          enable_gqa=k.shape[1] != q.shape[1])  # fmt: skip
    elif q.device.type == "cpu":
        layout = gathered(cu_seq_lens_q) if tunelab_layout is None else tunelab_layout
        if layout.width > MATMUL_MAX_LEN:  # the probabilities would grow with the square
            out = _by_document(query, key, value, cu_seq_lens_q.tolist(), scaling, window)
        else:
            out = _gathered(module, q, k, v, layout, scaling, dropout, window, **kwargs)
    else:
        out = _by_document(query, key, value, cu_seq_lens_q.tolist(), scaling, window)
    return out[None], None


def _gathered(module, q, k, v, layout: Gathered, scaling, dropout, window, **kwargs):
    """The grouped matmul attention (models/attention.py) over the row's tokens ``q``, ``k``,
    ``v`` [T, heads, D] gathered into ``layout``'s padded batch; [T, H, D] in row order."""
    from tunelab.models.attention import matmul_attention

    b, w = layout.allowed.shape[0], layout.width
    rows = _rows_function()

    def batch(x):  # [T, heads, D] -> [B, heads, W, D]
        picked = rows.apply(x, layout.slots, layout.back, False)
        return picked.view(b, w, *x.shape[1:]).transpose(1, 2)

    bias = _bias(layout, window, q.dtype)
    out, _ = matmul_attention(module, batch(q), batch(k), batch(v), bias, scaling=scaling,
                              dropout=dropout, **kwargs)  # fmt: skip
    return rows.apply(out.view(b * w, *out.shape[2:]), layout.back, layout.owners, True)


def _bias(layout: Gathered, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``layout``'s additive mask in the scores' ``dtype``, narrowed to ``window``: made once a
    forward for all the layers that share it (0.4 ms a layer for 8 × 128 slots), but afresh
    inside a compiled graph, which must not write to its inputs."""
    import torch

    cache = None if torch.compiler.is_compiling() else layout.biases
    if cache is not None and (window, dtype) in cache:
        return cache[window, dtype]
    allowed = layout.allowed if window is None else _within(layout.allowed, window)
    zero, never = torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype)
    bias = torch.where(allowed, zero, never)
    if cache is not None:
        cache[window, dtype] = bias
    return bias


def _within(allowed: torch.Tensor, window: int) -> torch.Tensor:
    """``allowed`` [B, 1, W, W] narrowed to the keys fewer than ``window`` back. A padding
    query row (its own slot not allowed) keeps its keys: no softmax row may be empty."""
    real = allowed.diagonal(dim1=-2, dim2=-1)[..., None]  # [B, 1, W, 1]
    return allowed & (_band(allowed.shape[-1], window, allowed.device) | ~real)


def _band(length: int, window: int, device) -> torch.Tensor:
    """The causal mask of a ``length``-token document within ``window``: [L, L] bool, query i
    sees key j where 0 <= i - j < window."""
    import torch

    idx = torch.arange(length, device=device)
    diff = idx[:, None] - idx[None, :]
    return (diff >= 0) & (diff < window)


@functools.cache
def _rows_function():
    import torch

    class Rows(torch.autograd.Function):
        """``x[index]`` whose gradient is gathered too — ``grad[inverse]`` (``pad``: with a zero
        row appended, where ``inverse`` points past the end) — instead of scattered into zeros
        with additions: exact here, because a padding slot's gradient is zero (its key is
        masked out, its query row's output is never put back)."""

        @staticmethod
        def forward(ctx, x, index, inverse, pad):
            ctx.save_for_backward(inverse)
            ctx.pad = pad
            return x.index_select(0, index)

        @staticmethod
        def backward(ctx, grad):
            (inverse,) = ctx.saved_tensors
            if ctx.pad:
                grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
            return grad.index_select(0, inverse), None, None, None

    return Rows


def _by_document(query, key, value, bounds: list[int], scaling, window=None) -> torch.Tensor:
    """Causal SDPA over each document of the row alone (within ``window``); [T, H, D]."""
    import torch
    import torch.nn.functional as F

    gqa = key.shape[1] != query.shape[1]
    parts = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        band = None if window is None or e - s <= window else _band(e - s, window, query.device)
        parts.append(F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], attn_mask=band,
            is_causal=band is None, scale=scaling, enable_gqa=gqa))  # fmt: skip
    return torch.cat(parts, dim=2)[0].transpose(0, 1)


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers' models can use."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
