"""LoRA (PEFT adapters on a frozen base) and QLoRA (the same on a 4/8-bit quantised base).

Adapters are saved in PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``),
loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, ModelError
from tunelab.models.methods.base import Method, check_keys, is_quantized, listing
from tunelab.models.methods.lora_forward import fuse_lora_forward

if TYPE_CHECKING:
    from torch import nn

TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qv": ["q_proj", "v_proj"],
}
ADAPTER_FILE = "adapter_model.safetensors"


class LoRA(Method):
    name = "lora"
    trains_base = False
    summary_fields = ("r", "alpha", "dropout", "targets", "rslora", "dora")

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, self.cfg.targets)
        model = self.prepare_base(model)
        config = LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            use_rslora=self.cfg.rslora,
            use_dora=self.cfg.dora,
            task_type="CAUSAL_LM",
        )
        return fuse_lora_forward(get_peft_model(model, config))

    def prepare_base(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None = None) -> None:
        self._require_peft(model)
        super().save(model, folder, state_dict)

    def load(self, model: nn.Module, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        self._require_peft(model)
        path = Path(folder) / ADAPTER_FILE
        if not path.is_file():
            raise ModelError(f"{path}: no adapter file; found: {listing(Path(folder))}")
        try:
            result = set_peft_model_state_dict(model, load_file(path))
        except RuntimeError as e:  # shape mismatch: another rank or other targets
            raise ModelError(f"{path}: does not fit the configured adapter: {e}") from e
        missing = [k for k in result.missing_keys if "lora_" in k]
        check_keys(path, missing, list(result.unexpected_keys))

    def under_autocast(self, model: nn.Module):
        """PEFT casts a LoRA layer's input to its fp32 weights, and autocast casts it straight
        back to half for the matmul: the same numbers, two copies per layer per pass (8 % of
        a bf16 step of the default model on a CPU). Under autocast the casting is left to autocast alone."""
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)

    def memory_advice(self) -> list[str]:
        return ["QLoRA (method.name=qlora, 4-bit base weights)"]

    def check_shape(self, shape) -> None:
        if not isinstance(self.cfg.targets, list):
            return
        names = [x.name for x in shape.linears] + ["lm_head"]
        missing = [t for t in self.cfg.targets if t not in names]
        if missing:
            raise ConfigError(
                f"method.targets: {', '.join(map(repr, missing))} match no module of this model; "
                f"its linear modules are: {', '.join(names)} (or use all-linear | attention | qv)"
            )

    def trainable_params(self, shape) -> int:
        return shape.lora_params(self.cfg.r, self.cfg.targets, self.cfg.dora)

    def largest_trained(self, shape) -> int:
        return self.cfg.r * max(max(x.fan_in, x.fan_out) for x in shape.linears)

    def _require_peft(self, model: nn.Module) -> None:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError(f"method {self.name!r} expects a PeftModel; call apply() first")


class QLoRA(LoRA):
    name = "qlora"
    summary_fields = ("r", "alpha", "dropout", "targets", "bits")

    @property
    def quantize_bits(self) -> int:  # type: ignore[override]
        return self.cfg.bits

    def check(self, placement) -> None:
        if placement.device.type != "cuda":
            raise ConfigError(
                "method.name: 'qlora' needs a CUDA GPU (bitsandbytes); on this machine use method.name=lora"
            )

    def prepare_base(self, model: nn.Module) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        if not is_quantized(model):
            raise ConfigError(
                "method.name: qlora needs a model loaded in 4/8-bit (bitsandbytes, CUDA); this "
                "one is not quantised: use lora, or load it with quantisation"
            )
        for bits in (4, 8):
            if getattr(model, f"is_loaded_in_{bits}bit", False) and bits != self.cfg.bits:
                raise ConfigError(
                    f"method.bits: {self.cfg.bits} but the model was loaded in {bits}-bit"
                )
        checkpointing = any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)

    def memory_advice(self) -> list[str]:
        return ["4-bit base weights (method.bits=4)"] if self.cfg.bits == 8 else []

    def weight_bytes(self, shape, precision: str) -> int:
        """Decoder linears quantised (NF4 with double-quantised block scales: ~4.127 bits;
        int8 with row scales); embeddings, head and norms in 16 bits."""
        bits = {4: 4.127, 8: 8.0}[self.cfg.bits]
        return int(shape.linear_params * bits / 8) + 2 * (shape.params - shape.linear_params)


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """``method.targets`` as PEFT's ``target_modules``: a preset expanded, each name checked.

    A name matches a module whose qualified name equals it or ends with ``.<name>`` (PEFT's
    rule). A name that matches nothing raises :class:`ConfigError` listing the linear modules.
    """
    if targets == "all-linear":
        return "all-linear"
    names = list(TARGET_PRESETS[targets]) if isinstance(targets, str) else list(targets)
    if not names:
        raise ConfigError("method.targets: empty list (expected module names or a preset)")
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        found = ", ".join(linear_module_names(model)) or "none"
        raise ConfigError(
            f"method.targets: {', '.join(map(repr, missing))} match no module of this model; "
            f"its linear modules are: {found} (or use all-linear | attention | qv)"
        )
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``lm_head``...)."""
    from torch import nn

    out: list[str] = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        leaf = name.rsplit(".", 1)[-1]
        if is_linear and leaf not in out:
            out.append(leaf)
    return out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A PeftModel with LoRA merged into the base weights, returned as the plain transformers
    model (the PeftModel is spent afterwards); any other model unchanged.

    When an adapter sits on a tied ``lm_head`` (or input embedding), the two are untied first:
    merging into the shared tensor would also change the other one.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    _untie_adapted_embeddings(model.get_base_model())
    return model.merge_and_unload(progressbar=False)


def _untie_adapted_embeddings(base: nn.Module) -> None:
    get_in = getattr(base, "get_input_embeddings", None)
    get_out = getattr(base, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return
    inp, out = get_in(), get_out()
    if not (hasattr(inp, "base_layer") or hasattr(out, "base_layer")):
        return  # no adapter on either side
    inp_base, out_base = getattr(inp, "base_layer", inp), getattr(out, "base_layer", out)
    if inp_base.weight is not out_base.weight:
        return
    from torch import nn

    weight = out_base.weight
    out_base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    for config in {id(c): c for c in _configs(base)}.values():
        config.tie_word_embeddings = False


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config, text]
