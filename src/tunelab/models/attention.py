"""Attention as two matrix products on a CPU: grouped, in the compute dtype, nothing repeated.

transformers' eager attention repeats each key/value head for the query heads that share it,
multiplies, adds the mask, takes the softmax in fp32 and casts the probabilities back — four
copies of the [batch, heads, length, length] scores, an fp32 one kept for the backward pass.
SDPA's CPU kernel keeps no scores but its backward is slow below ~512 tokens (fwd + bwd of
4 × 9 heads × 384 tokens in bf16: 39 ms against 21 ms here; docs/speed.md). This function:

- multiplies each key/value head with its group of query heads at once (``[G·T, D] @ [D, T]``,
  no repeated k/v), the scale applied to the queries first (as torch's own reference SDPA does;
  exact in bf16 when the scale is a power of two — 1/8 for 64-wide heads);
- adds transformers' additive eager mask (registered for :data:`NAME`) in the same pass that
  makes the scores a new tensor;
- takes the softmax in the scores' dtype: torch's CPU softmax accumulates half precision in
  fp32 and rounds once, so the probabilities equal eager's fp32 softmax cast to bf16, and only
  they are kept for the backward pass (2 bytes an entry in bf16 instead of 6).

On a CPU it is the attention for micro-batches up to :data:`~tunelab.models.device.MATMUL_MAX_LEN`
tokens wide; wider ones run SDPA, whose memory does not grow with the square of the length.
"""

from __future__ import annotations

import sys

# torch is imported inside the functions: `tunelab plan` reads this module and no torch
NAME = "tunelab_matmul"


def matmul_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):  # fmt: skip
    """transformers' attention interface: ``query`` [B, H, Tq, D], ``key``/``value``
    [B, H_kv, Tk, D], ``attention_mask`` additive [B, 1, Tq, Tk] or None; returns
    ([B, Tq, H, D], None). A model whose attention does more than this — logit soft-capping
    (Gemma 2), sink logits (gpt-oss) — gets its own eager attention instead."""
    import torch
    import torch.nn.functional as F

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                     **kwargs)  # fmt: skip

    b, heads, tq, d = query.shape
    kv, tk = key.shape[1], key.shape[2]
    groups = heads // kv
    scale = d**-0.5 if scaling is None else scaling
    q = (query * scale).reshape(b, kv, groups * tq, d)  # a k/v head's query heads, stacked
    scores = torch.matmul(q, key.transpose(2, 3))  # [B, H_kv, G·Tq, Tk]
    if attention_mask is not None:
        scores = scores.view(b, kv, groups, tq, tk) + attention_mask[:, :, None, :, :tk]
    probs = torch.softmax(scores.view(b, kv, groups * tq, tk), dim=-1)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, value).view(b, heads, tq, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers' models can use, with the
    additive mask eager attention gets."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, matmul_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
