"""RMSNorm in fewer passes over memory, for eager training on a CPU.

transformers' Llama-family RMSNorm (Llama, Qwen2/3, Mistral, Phi-3, SmolLM3 — one copied
forward) casts the input to fp32, squares it, takes the mean, multiplies by the reciprocal
root, casts back and multiplies by the weight: six passes over [tokens, hidden] forwards and
about as many again backwards, each a tensor autograd keeps or makes. :class:`RMSNorm` gives
the same forward — the sum of squares read straight from the input in fp32 (another order
of summation: equal to the bit on nearly every element in bf16), the normalised input rounded
once to the input's dtype, then the weight — and a backward written
out: two products and one fused multiply-add, in fp32, rounded once (1 ulp apart from
autograd's on a few % of elements in bf16). It keeps the normalised input and the [tokens, 1]
reciprocal roots. fwd + bwd of [8, 128, 576] in bf16 on this project's CPU: 2.4 ms against
2.9 ms.

Only modules whose forward is that exact code are changed (compared as bytecode with
``LlamaRMSNorm.forward``); Gemma's (1 + weight) norm and any rewritten one keep theirs. Under
``torch.compile`` the compiler fuses the original better, so compiled runs leave it alone.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm of ``model`` the written-out forward and backward;
    returns how many."""
    reference = _reference_code()
    fused = 0
    for module in model.modules():
        forward = type(module).__dict__.get("forward")
        code = getattr(forward, "__code__", None)
        if code is not None and _same_code(code, reference) and hasattr(module, "variance_epsilon"):
            module.forward = _forward.__get__(module)
            fused += 1
    return fused


def _reference_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def _same_code(code, reference) -> bool:
    return (code.co_code, code.co_names, code.co_consts) == (
        reference.co_code, reference.co_names, reference.co_consts)  # fmt: skip


def _forward(self, hidden_states):
    return _function().apply(hidden_states, self.weight, self.variance_epsilon)


@functools.cache
def _function():
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
            rstd = squares.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1] fp32
            normed = torch.empty_like(x)
            torch.mul(x, rstd, out=normed)  # in fp32, rounded once to x's dtype
            ctx.save_for_backward(normed, weight, rstd)
            return weight * normed

        @staticmethod
        def backward(ctx, grad):
            normed, weight, rstd = ctx.saved_tensors
            grad_normed = (grad * weight).to(normed.dtype)  # autograd's product and rounding
            grad_weight = None
            if ctx.needs_input_grad[1]:
                per_row = (grad * normed).reshape(-1, normed.shape[-1])
                grad_weight = per_row.sum(0, dtype=torch.float32).to(weight.dtype)
            g = grad_normed.float()
            mean = (g * normed).sum(-1, keepdim=True).div_(normed.shape[-1])
            grad_x = torch.empty_like(normed)
            torch.mul(torch.addcmul(g, normed, mean, value=-1), rstd, out=grad_x)
            return grad_x, grad_weight, None

    return RMSNorm
