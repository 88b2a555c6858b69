"""Full fine-tuning: every parameter is trained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.models.methods.base import Method

if TYPE_CHECKING:
    from torch import nn


class Full(Method):
    name = "full"
    shardable = True

    def apply(self, model: nn.Module) -> nn.Module:
        self.refuse_quantized(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def memory_advice(self) -> list[str]:
        return ["LoRA instead of full fine-tuning (method.name=lora)"]

    def trains_embedding(self, shape) -> bool:
        return True
