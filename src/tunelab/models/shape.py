"""A model's shape from its ``config.json`` alone: parameters by kind, the linear layers an
adapter can target, and the FLOPs of a training token — what ``tunelab plan`` needs to quote
memory and time without reading (or even having) the weights.

Counts follow the modules transformers builds for each family; ``tests/unit/test_shape.py``
checks them against ``AutoModelForCausalLM.from_config`` on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import ModelError

#: model_type -> (layout of a layer, norms per layer, q/k norms, bias on q/k/v)
FAMILIES = {
    "llama": ("gated", 2, False, None),
    "mistral": ("gated", 2, False, False),
    "qwen2": ("gated", 2, False, True),
    "qwen3": ("gated", 2, True, None),
    "gemma": ("gated", 2, False, None),
    "gemma2": ("gated", 4, False, None),
    "gemma3_text": ("gated", 4, True, None),
    "phi3": ("fused", 2, False, False),
    "phi": ("parallel", 1, False, True),
}
FAMILY_NAMES = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, Phi"


@dataclass(frozen=True)
class Linear:
    name: str  # the module's last name, as method.targets spells it
    fan_in: int
    fan_out: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]  # of one decoder layer
    layer_other: int  # norm (and q/k norm) parameters of one layer
    final_other: int  # the final norm (and the LM head's bias)

    @property
    def layer_params(self) -> int:
        return (
            sum(x.fan_in * x.fan_out + x.bias * x.fan_out for x in self.linears) + self.layer_other
        )

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def head(self) -> int:
        """Parameters of the LM head of their own (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embedding + self.head + self.layers * self.layer_params + self.final_other

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what QLoRA quantises)."""
        return self.layers * sum(x.fan_in * x.fan_out for x in self.linears)

    @property
    def matmul_params(self) -> int:
        """N of the FLOPs arithmetic: every matmul weight, the LM head counted (once)."""
        return self.linear_params + self.vocab * self.hidden

    def targeted(self, targets: list[str] | str) -> list[Linear]:
        """The linear layers of one decoder layer that ``method.targets`` names."""
        if targets == "all-linear":
            return list(self.linears)
        names = set(PRESETS[self.family][targets] if isinstance(targets, str) else targets)
        return [x for x in self.linears if x.name in names]

    def lora_params(self, r: int, targets: list[str] | str, dora: bool = False) -> int:
        per_layer = sum(
            r * (x.fan_in + x.fan_out) + dora * x.fan_out for x in self.targeted(targets)
        )
        head = (
            r * (self.hidden + self.vocab)
            if isinstance(targets, list) and "lm_head" in targets
            else 0
        )
        return self.layers * per_layer + head

    def train_flops_per_token(
        self,
        *,
        trains_base: bool,
        adapter: int,
        s_eff: float,
        head_share: float = 1.0,
        recompute: bool = False,
        reference: bool = False,
    ) -> float:
        """Training FLOPs per token (PERFORMANCE.md): 6N with the base trained, 4N + 6 N_adapter
        without; the LM head only for the share of tokens that carry loss weight; attention
        6 · layers · q width · s_eff (s_eff = Σl²/Σl); gradient checkpointing adds a forward,
        and so does a ``reference`` model scored in every step (DPO, KTO)."""
        head = self.vocab * self.hidden * head_share
        n = self.linear_params + head
        attention = 6 * self.layers * self.heads * self.head_dim * s_eff
        flops = (6 * n if trains_base else 4 * n + 6 * adapter) + attention
        if recompute:
            flops += 2 * self.linear_params + attention / 3
        if reference:
            flops += 2 * n + attention / 3
        return flops


#: method.targets presets per layout (what lora.TARGET_PRESETS expands to per family)
PRESETS = {
    **{f: {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "qv": ["q_proj", "v_proj"]}
       for f in FAMILIES},
    "phi3": {"attention": ["qkv_proj", "o_proj"], "qv": ["qkv_proj"]},
    "phi": {"attention": ["q_proj", "k_proj", "v_proj", "dense"], "qv": ["q_proj", "v_proj"]},
}  # fmt: skip


def model_shape(config: dict, where: str = "config.json") -> ModelShape:
    """The shape of the model ``config`` (a config.json dict) describes; a :class:`ModelError`
    naming the family for one tunelab cannot size."""
    text = config.get("text_config") if config.get("model_type") == "gemma3" else config
    family = (text or {}).get("model_type", config.get("model_type"))
    if family == "gemma3":
        family = "gemma3_text"
    if family not in FAMILIES:
        raise ModelError(
            f"{where}: model_type {family!r} is not a family tunelab plan can size "
            f"(known: {FAMILY_NAMES})"
        )
    try:
        return _shape(family, text)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ModelError(
            f"{where}: incomplete {family} config ({e!r} missing or invalid)"
        ) from None


def _shape(family: str, c: dict) -> ModelShape:
    layout, norms, qk_norm, qkv_bias = FAMILIES[family]
    h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    ff = int(c["intermediate_size"])
    if qkv_bias is None:
        qkv_bias = bool(c.get("attention_bias", False))
    out_bias = bool(c.get("attention_bias", False)) and family != "qwen2"
    mlp_bias = bool(c.get("mlp_bias", False))
    q, k = heads * hd, kv * hd
    if layout == "gated":
        linears = [Linear("q_proj", h, q, qkv_bias), Linear("k_proj", h, k, qkv_bias),
                   Linear("v_proj", h, k, qkv_bias), Linear("o_proj", q, h, out_bias),
                   Linear("gate_proj", h, ff, mlp_bias), Linear("up_proj", h, ff, mlp_bias),
                   Linear("down_proj", ff, h, mlp_bias)]  # fmt: skip
    elif layout == "fused":
        linears = [Linear("qkv_proj", h, q + 2 * k, False), Linear("o_proj", q, h, False),
                   Linear("gate_up_proj", h, 2 * ff, False), Linear("down_proj", ff, h, False)]  # fmt: skip
    else:  # phi: parallel attention and MLP, biases everywhere, LayerNorm with bias
        linears = [Linear("q_proj", h, q, True), Linear("k_proj", h, k, True),
                   Linear("v_proj", h, k, True), Linear("dense", q, h, True),
                   Linear("fc1", h, ff, True), Linear("fc2", ff, h, True)]  # fmt: skip
    layer_norm = 2 * h if layout == "parallel" else h
    tied = bool(c.get("tie_word_embeddings", family.startswith("gemma")))
    head_bias = int(c["vocab_size"]) if layout == "parallel" else 0
    return ModelShape(
        family=family, layers=int(c["num_hidden_layers"]), hidden=h, intermediate=ff,
        heads=heads, kv_heads=kv, head_dim=hd, vocab=int(c["vocab_size"]), tied=tied,
        linears=tuple(linears), layer_other=norms * layer_norm + qk_norm * 2 * hd,
        final_other=layer_norm + head_bias,
    )  # fmt: skip
