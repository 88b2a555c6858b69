"""What is trained (full, freeze, LoRA, QLoRA), and how the trained weights are saved and restored.

The training loop calls, in order::

    model = apply_method(model, cfg.method)             # freeze / wrap in LoRA
    params = trainable_named_parameters(model, cfg.method)
    optimizer = torch.optim.AdamW([p for _, p in params], ...)
    for step in ...:
        unfreeze_schedule(model, cfg.method, step)      # freeze with unfreeze_every > 0 only
        ...
    save_trained(model, cfg.method, folder)             # checkpoints and the final output
    load_trained_into(model, cfg.method, folder)        # exact resume, same method applied first

The optimizer holds every parameter that can ever be trained, in model order. A parameter whose
``requires_grad`` is False never gets a ``.grad``, and AdamW skips parameters without one (no
update, no weight decay, no state), so progressive unfreezing needs no change to the optimizer
and a resumed run rebuilds the same parameter list. See docs/methods.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError, ModelError

TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qv": ["q_proj", "v_proj"],
}
ADAPTER_FILE = "adapter_model.safetensors"


# ---- what is trained ---------------------------------------------------------------------------


def apply_method(model: nn.Module, method: MethodConfig) -> nn.Module:
    """Set what ``method`` trains; return the model (a ``PeftModel`` for lora/qlora).

    full: every parameter. freeze: the last ``trainable_layers`` transformer layers plus the
    modules whose qualified name contains one of ``trainable_modules``. lora/qlora: PEFT LoRA
    adapters on ``targets`` (the base is frozen). With tied input/output embeddings, training
    ``lm_head`` trains the embedding too (they are one tensor).
    """
    if method.name in ("full", "freeze") and _is_quantized(model):
        raise ConfigError(
            f"method.name: {method.name!r} cannot train a quantised (4/8-bit) model; "
            "use qlora, or load the model without quantisation"
        )
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.name == "freeze":
        layers = decoder_layers(model)
        if method.trainable_layers > len(layers):
            raise ConfigError(
                f"method.trainable_layers: {method.trainable_layers} but the model has "
                f"{len(layers)} transformer layers"
            )
        _set_freeze_state(model, method, method.trainable_layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(
                "method: freeze with trainable_layers 0 and no trainable_modules trains nothing"
            )
        return model
    if method.name in ("lora", "qlora"):
        return _apply_lora(model, method)
    raise ConfigError(f"method.name: unknown method {method.name!r}")  # pragma: no cover


def _apply_lora(model: nn.Module, method: MethodConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_targets(model, method.targets)
    if method.name == "qlora":
        if not _is_quantized(model):
            raise ConfigError(
                "method.name: qlora needs a model loaded in 4/8-bit (bitsandbytes, CUDA); this "
                "one is not quantised: use lora, or load it with quantisation"
            )
        for bits in (4, 8):
            if getattr(model, f"is_loaded_in_{bits}bit", False) and bits != method.bits:
                raise ConfigError(
                    f"method.bits: {method.bits} but the model was loaded in {bits}-bit"
                )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=_is_checkpointing(model)
        )
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        use_rslora=method.rslora,
        use_dora=method.dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


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
    out: list[str] = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        leaf = name.rsplit(".", 1)[-1]
        if is_linear and leaf not in out:
            out.append(leaf)
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers: the first ``nn.ModuleList`` named ``...model.layers``,
    else the first named ``...layers`` (Llama, Qwen2, Gemma, Mistral, Phi-3...)."""
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


def _set_freeze_state(model: nn.Module, method: MethodConfig, n_layers: int) -> list[str]:
    """Make exactly the last ``n_layers`` layers and the named modules trainable; return the
    names of the parameters that were frozen before and are trainable now."""
    layers = decoder_layers(model)
    keep = _module_params(model, method.trainable_modules)
    for layer in list(layers)[len(layers) - n_layers :]:
        keep.update(id(p) for p in layer.parameters())
    newly = []
    for name, p in model.named_parameters():
        trainable = id(p) in keep
        if trainable and not p.requires_grad:
            newly.append(name)
        p.requires_grad_(trainable)
    return newly


def unfreeze_schedule(model: nn.Module, method: MethodConfig, step: int) -> list[str]:
    """Progressive unfreezing (freeze with ``unfreeze_every > 0``); a no-op otherwise.

    Call it before every optimizer step with ``step`` = optimizer steps completed so far. Layers
    trained at ``step``: ``trainable_layers + (step // unfreeze_every) * unfreeze_layers``,
    capped at the number of layers, counted from the last. The state is set from ``step`` alone,
    so a resumed run recomputes it. Returns the names of the parameters unfrozen by this call.
    """
    if method.name != "freeze" or method.unfreeze_every <= 0:
        return []
    total = len(decoder_layers(model))
    n = method.trainable_layers + (step // method.unfreeze_every) * method.unfreeze_layers
    return _set_freeze_state(model, method, min(n, total))


def trainable_named_parameters(
    model: nn.Module, method: MethodConfig | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The parameters to give the optimizer, in model order: those that require grad now, and,
    with ``method`` = freeze with progressive unfreezing, every layer the schedule can unfreeze
    later (frozen until then: no grad, so AdamW leaves them untouched)."""
    later: set[int] = set()
    if method is not None and method.name == "freeze" and method.unfreeze_every > 0:
        later = {id(p) for p in decoder_layers(model).parameters()}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad or id(p) in later]


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


# ---- saving and restoring ----------------------------------------------------------------------


def save_trained(model: nn.Module, method: MethodConfig, folder: Path) -> None:
    """Write the trained weights to ``folder`` (the tokenizer is the caller's).

    lora/qlora: PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``),
    loadable with ``PeftModel.from_pretrained``. full/freeze: the whole model as a Hugging Face
    model folder (``config.json`` + safetensors).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if method.name in ("lora", "qlora"):
        _require_peft(model, method)
    model.save_pretrained(folder)


def load_trained_into(model: nn.Module, method: MethodConfig, folder: Path) -> None:
    """Restore, bit for bit, what :func:`save_trained` wrote into a model prepared with the same
    method (``apply_method`` already called)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if method.name in ("lora", "qlora"):
        from peft import set_peft_model_state_dict

        _require_peft(model, method)
        path = folder / ADAPTER_FILE
        if not path.is_file():
            raise ModelError(f"{path}: no adapter file; found: {_listing(folder)}")
        try:
            result = set_peft_model_state_dict(model, load_file(path))
        except RuntimeError as e:  # shape mismatch: another rank or other targets
            raise ModelError(f"{path}: does not fit the configured adapter: {e}") from e
        missing = [k for k in result.missing_keys if "lora_" in k]
        _check_keys(path, missing, list(result.unexpected_keys))
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name}: missing; found: {_listing(folder)}")
        state.update(load_file(folder / name))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"{folder}: the saved weights do not fit this model: {e}") from e
    # A key left out because it is tied to one that was loaded (lm_head -> embed_tokens) is fine.
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    _check_keys(folder, missing, list(result.unexpected_keys))


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


# ---- helpers -----------------------------------------------------------------------------------


def _is_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
    )


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _require_peft(model: nn.Module, method: MethodConfig) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(f"method {method.name!r} expects a PeftModel; call apply_method first")


def _check_keys(where: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ModelError(
            f"{where}: the saved weights do not match the model: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return "no such folder"
    return ", ".join(sorted(p.name for p in folder.iterdir())) or "an empty folder"
