"""Model shapes from config.json alone: parameter counts equal the modules transformers builds
(on the meta device, for every family plan sizes), LoRA's adapter size equals PEFT's, and the
FLOPs per token reproduce PERFORMANCE.md's table."""

import pytest
import torch

from tunelab.config.schema import MethodConfig
from tunelab.errors import ModelError
from tunelab.models.methods import get_method
from tunelab.models.shape import model_shape

TINY = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=160,
            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=1000)  # fmt: skip
FAMILIES = {
    "llama": dict(tie_word_embeddings=True), "mistral": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True), "qwen3": dict(head_dim=32, tie_word_embeddings=True),
    "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16),
    "phi3": dict(tie_word_embeddings=False), "phi": dict(),
}  # fmt: skip


def _built(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY, **extra)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_equals_the_model_transformers_builds(family):
    config, model = _built(family, **FAMILIES[family])
    shape = model_shape(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    linear = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert {x.name for x in shape.linears} == linear - {"lm_head"}


@pytest.mark.parametrize("targets", ["all-linear", "attention", "qv", ["q_proj", "down_proj"]])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_lora_size_equals_peft(family, targets):
    from peft import LoraConfig, get_peft_model

    if family == "phi3" and isinstance(targets, list):
        targets = ["qkv_proj", "down_proj"]
    config, model = _built(family, **FAMILIES[family])
    shape = model_shape(config.to_dict())
    preset = {"attention": shape.targeted("attention"), "qv": shape.targeted("qv")}
    names = (
        "all-linear"
        if targets == "all-linear"
        else [x.name for x in preset[targets]]
        if isinstance(targets, str)
        else targets
    )
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=names))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (
        get_method(MethodConfig(name="lora", r=8, targets=targets)).trainable_params(shape)
        == trained
    )


def test_flops_per_token_match_the_performance_table():
    """PERFORMANCE.md: LoRA r16 all-linear, 4N + 6 N_lora + attention: Qwen2.5-0.5B 2.07,
    Llama-3.2-1B 5.07 GFLOP per token (its Alpaca-like lengths: s_eff about 300)."""
    qwen = model_shape(dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                            tie_word_embeddings=True))  # fmt: skip
    llama = model_shape(dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             tie_word_embeddings=True))  # fmt: skip
    for shape, expected in ((qwen, 2.07), (llama, 5.07)):
        lora = shape.lora_params(16, "all-linear")
        flops = shape.train_flops_per_token(trains_base=False, adapter=lora, s_eff=300)
        assert flops / 1e9 == pytest.approx(expected, abs=0.005)
    full = llama.train_flops_per_token(trains_base=True, adapter=0, s_eff=0)
    assert full == 6 * llama.matmul_params
    with_attention = llama.train_flops_per_token(trains_base=True, adapter=0, s_eff=100)
    assert with_attention - full == 6 * 16 * 2048 * 100
    half_head = llama.train_flops_per_token(trains_base=True, adapter=0, s_eff=0, head_share=0.5)
    assert full - half_head == 3 * 128256 * 2048
    scored = llama.train_flops_per_token(trains_base=True, adapter=0, s_eff=100, reference=True)
    assert scored - with_attention == 2 * llama.matmul_params + 2 * 16 * 2048 * 100  # a forward


def test_unknown_family_is_named():
    with pytest.raises(ModelError, match=r"model_type 'gpt2' is not a family .*Llama, Mistral"):
        model_shape({"model_type": "gpt2", "n_embd": 64}, where="cfg.json")


def test_incomplete_config_is_named():
    with pytest.raises(ModelError, match=r"cfg.json: incomplete llama config .*hidden_size"):
        model_shape({"model_type": "llama", "num_attention_heads": 4}, where="cfg.json")


def test_gemma3_multimodal_config_is_sized_by_its_text_model():
    text = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=1000)  # fmt: skip
    assert (
        model_shape({"model_type": "gemma3", "text_config": text}).params
        == model_shape(text).params
    )
