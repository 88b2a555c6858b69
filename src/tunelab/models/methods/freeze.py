"""Freeze: train the last N transformer layers (plus named modules), optionally unfreezing more
layers as training goes (progressive unfreezing). With tied input/output embeddings, training
``lm_head`` trains the embedding too (they are one tensor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.errors import ConfigError
from tunelab.models.methods.base import Method

if TYPE_CHECKING:
    from torch import nn


class Freeze(Method):
    name = "freeze"
    summary_fields = ("trainable_layers", "trainable_modules", "unfreeze_every")

    def apply(self, model: nn.Module) -> nn.Module:
        self.refuse_quantized(model)
        layers = decoder_layers(model)
        if self.cfg.trainable_layers > len(layers):
            raise ConfigError(
                f"method.trainable_layers: {self.cfg.trainable_layers} but the model has "
                f"{len(layers)} transformer layers"
            )
        _set_freeze_state(model, self.cfg, self.cfg.trainable_layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(
                "method: freeze with trainable_layers 0 and no trainable_modules trains nothing"
            )
        return model

    def optimizer_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Those that require grad now and, with progressive unfreezing, every layer the
        schedule can unfreeze later (frozen until then: no grad, so AdamW leaves them alone)."""
        later: set[int] = set()
        if self.cfg.unfreeze_every > 0:
            later = {id(p) for p in decoder_layers(model).parameters()}
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad or id(p) in later]

    def on_step(self, model: nn.Module, step: int) -> list[str]:
        """Progressive unfreezing (``unfreeze_every > 0``); a no-op otherwise. Layers trained at
        ``step``: ``trainable_layers + (step // unfreeze_every) * unfreeze_layers``, capped,
        counted from the last. Set from ``step`` alone, so a resumed run recomputes it."""
        if self.cfg.unfreeze_every <= 0:
            return []
        total = len(decoder_layers(model))
        n = self.cfg.trainable_layers + (step // self.cfg.unfreeze_every) * self.cfg.unfreeze_layers
        return _set_freeze_state(model, self.cfg, min(n, total))

    def memory_advice(self) -> list[str]:
        return ["LoRA instead of full fine-tuning (method.name=lora)"]

    def check_shape(self, shape) -> None:
        if self.cfg.trainable_layers > shape.layers:
            raise ConfigError(f"method.trainable_layers: {self.cfg.trainable_layers} but the model "
                              f"has {shape.layers} transformer layers")  # fmt: skip

    def trained_layers(self, shape) -> int:
        return min(self.cfg.trainable_layers, shape.layers)

    def trainable_params(self, shape) -> int:
        return self.trained_layers(shape) * shape.layer_params

    def largest_trained(self, shape) -> int:
        return max(x.fan_in * x.fan_out for x in shape.linears)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers: the first ``nn.ModuleList`` named ``...model.layers``,
    else the first named ``...layers`` (Llama, Qwen2, Gemma, Mistral, Phi-3...)."""
    from torch import nn

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for suffix in ("model.layers", "layers"):
        for name, module in lists:
            if name == suffix or name.endswith("." + suffix):
                return module
    raise ConfigError(
        f"method.name: freeze needs the model's list of transformer layers, and "
        f"{type(model).__name__} has no nn.ModuleList named '*layers'; use lora or full"
    )


def _module_params(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the parameters of every module whose qualified name contains one of ``patterns``."""
    out: set[int] = set()
    for pattern in patterns:
        hits = [m for n, m in model.named_modules() if n and pattern in n]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
            raise ConfigError(
                f"method.trainable_modules: {pattern!r} is in no module name of this model; "
                f"module names include: {', '.join(leaves)}"
            )
        out.update(id(p) for m in hits for p in m.parameters())
    return out


def _set_freeze_state(model: nn.Module, cfg, n_layers: int) -> list[str]:
    """Make exactly the last ``n_layers`` layers and the named modules trainable; return the
    names of the parameters that were frozen before and are trainable now."""
    layers = decoder_layers(model)
    keep = _module_params(model, cfg.trainable_modules)
    for layer in list(layers)[len(layers) - n_layers :]:
        keep.update(id(p) for p in layer.parameters())
    newly = []
    for name, p in model.named_parameters():
        trainable = id(p) in keep
        if trainable and not p.requires_grad:
            newly.append(name)
        p.requires_grad_(trainable)
    return newly
