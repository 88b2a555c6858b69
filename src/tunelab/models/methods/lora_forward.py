"""A plain LoRA layer's forward, ``base(x) + s * B(A(x))``, in fewer passes than PEFT's.

- **The scale-and-add is one in-place ``addmm_``** into the base output, instead of PEFT's
  product, scaling and sum (three passes over [tokens, out] forwards and one backwards fewer).
- **Siblings share their A product.** Layers of one module that are called one after another on
  the same input — the attention's q, k and v projections, the MLP's gate and up — make their
  A products in one matrix product against their A weights stacked: one pass over the input
  instead of three, and backwards one product for the input's gradient and one for the stacked
  weights' instead of one each per layer (a [tokens, in] × [in, r] product reads the whole
  input for r columns: memory-bound on a CPU).

Layers with dropout, a variant (DoRA), a bias on B, several adapters, or a call PEFT handles
specially (merged, disabled, per-row adapters) run PEFT's own forward; inside a compiled graph
each layer makes its own A product (the compiler fuses the rest, and the sharing's bookkeeping
is Python state it must not write). PEFT's module tree, state dict and saved adapters are
untouched: the forward is an instance attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

#: names of sibling layers under one parent, in the order transformers' models call them on one
#: input (Llama, Qwen2/3, Mistral, Gemma, SmolLM: the attention's and the gated MLP's inputs)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_forward(model: nn.Module) -> nn.Module:
    """Give every PEFT LoRA ``Linear`` of ``model`` the forward above, and group siblings."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:
            module.forward = _forward.__get__(module)
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if type(m) is Linear]
            if len(members) > 1:
                group = Siblings(members)
                for member in members:
                    member.__dict__["tunelab_siblings"] = group
    return model


def _plain(layer, x: torch.Tensor) -> str | None:
    """The adapter ``layer`` adds to ``x`` as plain LoRA (no dropout, no variant, no bias on B,
    one active adapter, neither merged nor disabled); None where PEFT's forward must run."""
    import torch
    from torch import nn

    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        name in layer.lora_A
        and not (layer.disable_adapters or layer.merged)
        and name not in layer.lora_variant
        and type(layer.base_layer) is nn.Linear
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and layer.lora_B[name].bias is None
        # without autocast PEFT casts x to the adapter's dtype; that case stays PEFT's
        and (x.dtype == layer.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type))
    )
    return name if plain else None


def _forward(self, x, *args, **kwargs):
    import torch

    name = None if args or kwargs else _plain(self, x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])  # 2-D throughout: an in-place op on a view would be
    result = self.base_layer(rows)  # copied back in the backward pass
    group = self.__dict__.get("tunelab_siblings")
    a = None
    if group is not None and not torch.compiler.is_compiling():
        a = group.part(self, x, rows, name)
    if a is None:
        a = self.lora_A[name](rows)
    b = self.lora_B[name].weight.to(result.dtype)  # autocast's cast: in-place ops get none
    # into the base output itself: nothing else holds it (the base product's backward needs
    # its inputs only), so no copy of [tokens, out] is made — an out-of-place addmm copies it
    result.addmm_(a, b.t(), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


class Siblings:
    """LoRA layers called one after another on the same input. The first member called on an
    input makes every member's A product at once; each member then takes its part, and the
    group forgets the input when all have (a member called again, or on another input, starts
    a new product)."""

    def __init__(self, members: list) -> None:
        self.members = members
        self._input = self._state = None
        self._parts: dict = {}

    def part(self, member, x: torch.Tensor, rows: torch.Tensor, name: str):
        """``member``'s A product of ``x`` ([tokens, r], ``rows`` is ``x`` in 2-D), or None when
        a sibling cannot share it."""
        import torch
        import torch.nn.functional as F

        state = (
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(x.device.type),
            [m.lora_A[name].weight._version for m in self.members],  # an optimizer step
        )
        if not (self._input is x and self._state == state and member in self._parts):
            if any(_plain(m, x) != name for m in self.members):
                return None
            weights = [m.lora_A[name].weight for m in self.members]
            stacked = F.linear(rows, torch.cat(weights))  # autocast casts the stack once
            parts = stacked.split([w.shape[0] for w in weights], dim=1)
            self._parts = dict(zip(self.members, parts, strict=True))
            self._input, self._state = x, state
        part = self._parts.pop(member)
        if not self._parts:
            self._input = self._state = None
        return part
