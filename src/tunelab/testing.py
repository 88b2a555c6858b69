"""Tiny tokenizers and models built in-process, for tests and benchmarks (no hub needed).

The tokenizers are real byte-level BPE tokenizers (the kind Llama 3, Qwen and SmolLM use),
trained in a fraction of a second on a small built-in corpus, with the special tokens and chat
templates of common families:

* ``chatml``: ``<|im_start|>``/``<|im_end|>`` turns, BOS = ``<|im_start|>``, EOS = PAD =
  ``<|im_end|>`` (like SmolLM2-Instruct, where pad equals EOS);
* ``llama3``: a separate ``<|begin_of_text|>`` BOS, turns closed by ``<|eot_id|>`` (the EOS),
  PAD ``<|finetune_pad|>``. As with Llama 3's own ``tokenizer.json``, two things write BOS:
  the chat template (``{{ bos_token }}``) and the backend tokenizer's ``TemplateProcessing``
  post-processor, which prepends it whenever special tokens are added. A naive
  ``tokenizer(rendered_text)`` therefore starts with two BOS (so a test can catch a double
  BOS), while ``apply_chat_template(tokenize=True)``, which adds no special tokens, gives one;
* ``base``: no chat template at all (tunelab's default template applies).
"""

from __future__ import annotations

from functools import cache

CORPUS = """\
The quick brown fox jumps over the lazy dog. Extract the name, age and city as JSON.
{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "email": "maria@example.com"}
You are a helpful assistant. What is the capital of France? Paris is the capital of France.
Translate to French: good morning. Bonjour. Summarise the text in one sentence, please.
SELECT name FROM users WHERE age > 30 ORDER BY name; count the rows, then answer.
0123456789 user assistant system instruction input output response question answer.
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": [
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|finetune_pad|>",
    ],
    "base": ["<s>", "</s>", "<pad>"],
}


@cache
def _backend(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_SPECIALS[kind],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if kind == "llama3":
        tok.post_processor = _llama3_post_processor(tok)
    return tok.to_str()


def _llama3_post_processor(tok):
    """What Meta's Llama 3 ``tokenizer.json`` holds: byte-level offsets, then BOS prepended to
    every sequence (and to each of a pair) when special tokens are added."""
    from tokenizers import processors

    bos = "<|begin_of_text|>"
    return processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        ),
    ])  # fmt: skip


def tiny_tokenizer(kind: str = "chatml"):
    """A fresh ``PreTrainedTokenizerFast`` of the given family (see the module docstring)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend(kind))
    if kind == "chatml":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
            pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
        )  # fmt: skip
    if kind == "llama3":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            pad_token="<|finetune_pad|>", chat_template=LLAMA3_TEMPLATE,
            additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
        )  # fmt: skip
    if kind == "base":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    raise ValueError(f"unknown tiny tokenizer kind {kind!r}")


#: the tiny Gemma 3's sliding window (tokens a query sees, itself included)
SLIDING_WINDOW = 4


def tiny_model(tokenizer, *, arch: str = "llama", seed: int = 0, layers: int = 2):
    """A randomly initialised 2-layer, 64-wide causal LM sized to ``tokenizer`` (fp32, CPU)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "gemma":
        config = GemmaConfig(**common, head_dim=16)
    elif arch == "gemma3":  # a sliding window of 4 tokens on every layer but the last
        kinds = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=SLIDING_WINDOW,
                                  layer_types=kinds, query_pre_attn_scalar=16)  # fmt: skip
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def tiny_model_dir(path, *, kind: str = "chatml", arch: str = "llama", seed: int = 0):
    """Save a tiny model and its tokenizer as a Hugging Face model folder; return the path."""
    from pathlib import Path

    path = Path(path)
    tok = tiny_tokenizer(kind)
    tiny_model(tok, arch=arch, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path
