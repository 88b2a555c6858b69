"""The contract every method fulfils, and what full and freeze share: whole-model weights.

The recipe calls, in order::

    method.check(placement)                  # before any weight is read (QLoRA needs CUDA...)
    model = method.apply(model)              # freeze / wrap in LoRA; returns the model to train
    params = method.optimizer_parameters(model)
    for step in ...:
        method.on_step(model, step)          # progressive unfreezing; a no-op elsewhere
    method.save(model, folder)               # checkpoints and the final output
    method.load(model, folder)               # exact resume (apply() called first)
    model = method.merge(model)              # a plain transformers model, for evaluation

The optimizer holds every parameter that can ever be trained, in model order. A parameter whose
``requires_grad`` is False never gets a ``.grad``, and AdamW skips parameters without one (no
update, no weight decay, no state), so progressive unfreezing needs no change to the optimizer
and a resumed run rebuilds the same parameter list.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported where a model is at hand: `tunelab plan` reads no torch
    import torch
    from torch import nn


class Method:
    name = "method"
    #: Whether base weights are trained (then they stay fp32 under mixed precision).
    trains_base = True
    #: Whether several processes shard the training (FSDP): every parameter trained, so the
    #: weights, gradients and AdamW state are what fills a device (train/distributed.py).
    shardable = False
    #: Load the base weights in 4/8-bit (QLoRA): the bits, else None.
    quantize_bits: int | None = None
    #: Settings worth a glance in summaries (the rest is in config.yaml).
    summary_fields: tuple[str, ...] = ()

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def check(self, placement) -> None:
        """Refuse what cannot work on this machine, before any weight is read."""

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def optimizer_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters to give the optimizer, in model order."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_step(self, model: nn.Module, step: int) -> list[str]:
        """Called before every optimizer step with the steps completed so far; returns the
        names of parameters it made trainable."""
        return []

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None = None) -> None:
        """The whole model as a Hugging Face model folder (``config.json`` + safetensors);
        ``state_dict``: the weights to write instead of the model's own (gathered from shards)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, state_dict=state_dict)

    def load(self, model: nn.Module, folder: Path) -> None:
        """Restore, bit for bit, what :meth:`save` wrote into a model prepared by :meth:`apply`."""
        load_model_weights(model, Path(folder))

    def merge(self, model: nn.Module) -> nn.Module:
        return model

    def under_autocast(self, model: nn.Module):
        """A context for forwards under autocast (LoRA: no casting of inputs to fp32)."""
        return contextlib.nullcontext()

    def memory_advice(self) -> list[str]:
        """What this method could change to need less memory (the OOM message lists these)."""
        return []

    # -- sizes, from the model's shape alone (tunelab plan: models/memory.py) ---------------
    def check_shape(self, shape) -> None:
        """Refuse settings this model's shape cannot take (apply checks the same on weights)."""

    def trainable_params(self, shape) -> int:
        """Parameters this method trains on a model of ``shape`` (a models.shape.ModelShape)."""
        return shape.params

    def weight_bytes(self, shape, precision: str) -> int:
        """The model's weights as this method holds them: trained weights in fp32 (master
        weights; autocast computes in half), frozen ones in the compute precision."""
        return shape.params * (4 if self.trains_base or precision == "fp32" else 2)

    def trained_layers(self, shape) -> int:
        """Decoder layers that keep activations for the backward pass."""
        return shape.layers

    def largest_trained(self, shape) -> int:
        """Elements of the largest trained tensor (the optimizer's update works one at a time)."""
        return max([shape.vocab * shape.hidden] + [x.fan_in * x.fan_out for x in shape.linears])

    def trains_embedding(self, shape) -> bool:
        """Whether the embedding gets a gradient (out of a tied head, early in the backward)."""
        return False

    def describe(self) -> str:
        values = self.cfg.model_dump(mode="json")
        shown = ", ".join(
            f"{k}={values[k]}"
            for k in self.summary_fields
            if values.get(k) not in (None, [], False)
        )
        return f"{self.name} ({shown})" if shown else self.name

    def refuse_quantized(self, model: nn.Module) -> None:
        if is_quantized(model):
            raise ConfigError(
                f"method.name: {self.name!r} cannot train a quantised (4/8-bit) model; "
                "use qlora, or load the model without quantisation"
            )


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load a model folder's safetensors (sharded or not) into ``model``, strictly."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name}: missing; found: {listing(folder)}")
        state.update(load_file(folder / name))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"{folder}: the saved weights do not fit this model: {e}") from e
    # A key left out because it is tied to one that was loaded (lm_head -> embed_tokens) is fine.
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    check_keys(folder, missing, list(result.unexpected_keys))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied tensor counts once, 4-bit packed ones unpacked."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit values per byte of storage
            quant_storage = getattr(p, "quant_storage", None)
            n *= 2 * (quant_storage.itemsize if quant_storage is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def is_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
    )


def check_keys(where: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ModelError(
            f"{where}: the saved weights do not match the model: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def listing(folder: Path) -> str:
    if not folder.is_dir():
        return "no such folder"
    return ", ".join(sorted(p.name for p in folder.iterdir())) or "an empty folder"
