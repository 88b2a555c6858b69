"""The weighted next-token loss of a causal LM, *summed* (never averaged), and perplexity.

Training (every objective) and evaluation (the loss of reference answers) both measure a model
with :func:`causal_lm_nll_sum`, so "loss" means one thing across tunelab:

    sum over targets t of  w_t * NLL(token_t | tokens_<t)

where ``weights[b, t]`` is the weight of token ``t`` as a prediction target (0 for padding).
Callers divide by the matching sum of weights themselves; that is what keeps gradient
accumulation exact (see ``tunelab.train.loop.accumulate``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.models import varlen
from tunelab.models.device import HEAD_CHUNK


def target_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights of the prediction targets: token t is predicted from positions < t."""
    return weights[:, 1:]


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
    full [N, vocab] fp32 logits never exist.
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


class FusedHeadNLL(torch.autograd.Function):
    """sum w * NLL of ``hidden @ weight.T`` whose gradient is computed in the forward pass, one
    chunk of rows at a time: the softmax minus the one-hot is multiplied straight back into the
    gradient of ``hidden`` (and of ``weight`` when it trains). No chunk's logits are kept and
    none are recomputed — two head matmuls per row instead of the three of a checkpointed head,
    and the memory of one chunk. Under autocast the matmuls run in its dtype, the softmax in
    fp32, as autograd would."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, w, softcap, chunk, need_hidden, need_weight):
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            total, grad_h, grad_w = _fused_head(
                hidden, weight.to(dtype), targets, w, softcap, chunk, dtype,
                need_hidden, need_weight,
            )  # fmt: skip
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad.to(grad_h.dtype) if ctx.needs_input_grad[0] else None,
            (grad_w * grad).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
            *([None] * 6),
        )


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _fused_head(hidden, weight, targets, w, softcap, chunk, dtype, need_hidden, need_weight):
    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight \
        else weight.new_empty(0)  # fmt: skip
    need_grad = need_hidden or need_weight
    for i in range(0, n, chunk):
        h = hidden[i : i + chunk].to(dtype)
        logits, dcap = h @ weight.t(), None
        if softcap:
            capped = torch.tanh(logits.float() / softcap)
            logits, dcap = capped * softcap, 1 - capped * capped
        wi = w[i : i + chunk]
        # rows weighted before both products when the head trains, after the [rows, hidden]
        # product otherwise (cheaper than scaling [rows, vocab])
        nll, g = softmax_nll(logits, targets[i : i + chunk], dtype if need_grad else None,
                             dcap, wi if need_weight else None)  # fmt: skip
        total += (nll * wi).sum()
        if need_weight:
            grad_w += (g.t() @ h).float()
        if need_hidden:
            grad_h[i : i + chunk] = g @ weight if need_weight else (g @ weight) * wi[:, None]
    return total, grad_h, grad_w


#: Rows of a chunk's logits that :func:`softmax_nll` takes through its fp32 passes at a time:
#: small enough to stay in a core's cache between passes (the default model's 49k-word vocab:
#: 32 rows = 6 MiB in fp32), 1.6x faster than whole-chunk log_softmax on a 2-core CPU.
HEAD_BLOCK = 32


def softmax_nll(logits, targets, grad_dtype, dcap=None, scale=None, block: int = HEAD_BLOCK):
    """-log softmax(logits)[target] per row, in fp32, and — unless ``grad_dtype`` is None — its
    gradient with respect to the logits, (softmax - one-hot) × ``dcap`` × ``scale`` per row, in
    ``grad_dtype``. Works through ``block`` rows at a time in one reused fp32 buffer, and writes
    the gradient over the logits when they are already in ``grad_dtype`` (fresh [rows, vocab]
    buffers cost page faults on every micro-batch: 50 → 23 ms for 490 rows of a 49k vocab)."""
    n, rows = logits.shape[0], torch.arange(min(block, logits.shape[0]), device=logits.device)
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if grad_dtype is None:
        grad = None
    elif logits.dtype == grad_dtype:
        grad = logits
    else:
        grad = torch.empty(logits.shape, dtype=grad_dtype, device=logits.device)
    buffer = None if logits.dtype == torch.float32 else \
        torch.empty((min(block, n), logits.shape[1]), dtype=torch.float32, device=logits.device)  # fmt: skip
    in_place = buffer is None and grad is logits  # each block's passes already write the gradient
    for i in range(0, n, block):
        t = targets[i : i + block]
        x = (
            logits[i : i + block]
            if buffer is None
            else buffer[: t.shape[0]].copy_(logits[i : i + block])
        )
        r = rows[: x.shape[0]]
        top = x.amax(-1, keepdim=True)
        picked = x[r, t]
        total = x.sub_(top).exp_().sum(-1, keepdim=True)
        nll[i : i + block] = total.log().squeeze(1) + top.squeeze(1) - picked
        if grad is None:
            continue
        x.div_(total)
        x[r, t] -= 1
        if dcap is not None:
            x.mul_(dcap[i : i + block])
        if scale is not None:
            x.mul_(scale[i : i + block, None])
        if not in_place:
            grad[i : i + block] = x
    return nll, grad


def fused_head_nll_sum(hidden, head, softcap, targets, weights, chunk: int) -> torch.Tensor:
    """:class:`FusedHeadNLL` for a plain linear head (no bias, no adapter on it); the
    checkpointed :func:`chunked_head_nll_sum` for any other."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return chunked_head_nll_sum(hidden, head, softcap, targets, weights, chunk)
    grad = torch.is_grad_enabled()
    return FusedHeadNLL.apply(
        hidden, head.weight, targets, weights, softcap, chunk,
        grad and hidden.requires_grad, grad and head.weight.requires_grad,
    )  # fmt: skip


def causal_lm_nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    weights: torch.Tensor,
    chunk: int = HEAD_CHUNK,
    documents: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """The summed weighted NLL of a batch; logits only for targets with a weight, ``chunk``
    rows at a time (the plain forward when the model cannot be split into decoder and head).
    ``attention_mask`` None: packed rows, separated by ``position_ids`` restarting at 0;
    ``documents``: their (cumulative lengths, longest), handed to a varlen attention."""
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    if documents is not None and documents[0] is not None:
        inputs.update(varlen.attention_inputs(*documents, input_ids.device))
    parts = split_head(model)
    if parts is None:
        return weighted_nll_sum(model(**inputs).logits, input_ids, weights)
    decoder, head, softcap = parts
    hidden = decoder(**inputs).last_hidden_state
    w = weights[:, 1:]
    keep = w > 0
    return fused_head_nll_sum(
        hidden[:, :-1][keep], head, softcap, input_ids[:, 1:][keep], w[keep], chunk
    )


def chunked_head_logps(hidden, head, softcap, targets, chunk: int) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` [N, d], ``chunk`` rows of logits at a time
    (recomputed in the backward pass, like :func:`chunked_head_nll_sum`)."""

    def piece(h, t):
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return -F.cross_entropy(logits, t, reduction="none")

    parts = []
    for i in range(0, hidden.shape[0], chunk):
        args = (hidden[i : i + chunk], targets[i : i + chunk])
        use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
        parts.append(
            checkpoint(piece, *args, use_reentrant=False) if use_checkpoint else piece(*args)
        )
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """[B, T-1] fp32: log p(token_t | tokens_<t) at every target t where ``targets[:, t]`` is
    true, 0 elsewhere — what the preference objectives sum per sequence. Logits are computed
    only for those targets, ``chunk`` rows at a time."""
    keep = targets[:, 1:].bool()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=False)  # fmt: skip
    out = torch.zeros(keep.shape, dtype=torch.float32, device=input_ids.device)
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][keep].float()
        picked = -F.cross_entropy(logits, input_ids[:, 1:][keep], reduction="none")
    else:
        decoder, head, softcap = parts
        hidden = decoder(**inputs).last_hidden_state
        picked = chunked_head_logps(
            hidden[:, :-1][keep], head, softcap, input_ids[:, 1:][keep], chunk
        )
    return out.masked_scatter(keep, picked)


def perplexity(loss: float | None) -> float | None:
    """exp(loss per token); inf for a loss too large to exponentiate, None for no loss."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")
