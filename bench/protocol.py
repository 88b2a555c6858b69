"""PERFORMANCE.md's GPU protocol, built on this machine: a random-initialised model of a known
shape saved once (so every contender loads identical weights), synthetic conversations whose
tokens follow a fixed low-entropy Markov chain (so the loss really falls), and the run's config.

tunelab reads text, so the model folder carries a word-level tokenizer of the shape's whole
vocabulary: word ``w17`` is one token, and a message of n words is n tokens. The chat template
is ChatML's (``<|im_start|>user ... <|im_end|>``), 6 tokens around a two-turn conversation.

Used by ``bench/train_speed.py --shape SHAPE``; ``tiny`` runs the same path on a CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

#: The shapes of PERFORMANCE.md (config.json fields), and a tiny one for a CPU check of the path.
SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                         intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128_256, rope_theta=500_000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                         intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151_936, rope_theta=1_000_000.0, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2_048,
                 tie_word_embeddings=True),
}  # fmt: skip
#: Alpaca-like: lognormal(median 140, sigma 0.75) tokens clipped to [16, 1024]; ShareGPT-like:
#: lognormal(median 600, sigma 1.0) clipped to [32, 4096] (PERFORMANCE.md)
LENGTHS = {"alpaca": (140, 0.75, 16, 1024), "sharegpt": (600, 1.0, 32, 4096)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)
OVERHEAD = 6  # tokens the template adds to a user + assistant conversation
CHAIN_WORDS = 8_192  # the chain's states: each seen often enough in a run for the loss to fall
#: each state's successors and their probabilities: ~1.1 nats a token once learned
SUCCESSORS = (0.6, 0.2, 0.15, 0.05)


def word_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens, ChatML-templated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ROLES
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=TEMPLATE,
    )  # fmt: skip


def build_model(shape: str, folder: Path, *, seed: int = 0) -> Path:
    """Save a random-initialised model of ``shape`` and its tokenizer to ``folder`` (bf16 for
    the real shapes, as they train; fp32 for ``tiny``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    tok = word_tokenizer(fields["vocab_size"])
    config = AutoConfig.for_model(
        fields.pop("model_type"), **fields, max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 1B parameters on the CPU takes a while
        model = AutoModelForCausalLM.from_config(config)
    if shape != "tiny":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def conversations(n: int, vocab_size: int, *, lengths: str = "alpaca", seed: int = 0) -> list[dict]:
    """``n`` two-turn conversations of lengths drawn as PERFORMANCE.md says (template included),
    the user's share uniform in 0.2-0.6, every word from one Markov chain over the first
    ``CHAIN_WORDS`` words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    states = min(CHAIN_WORDS, vocab_size - len(SPECIALS) - len(ROLES))
    successors = rng.integers(0, states, size=(states, len(SUCCESSORS)))
    median, sigma, low, high = LENGTHS[lengths]
    total = np.clip(np.round(median * rng.lognormal(0.0, sigma, size=n)), low, high).astype(int)
    rows, state = [], 0
    for length in total:
        words = []
        for pick in rng.choice(len(SUCCESSORS), size=length - OVERHEAD, p=SUCCESSORS):
            state = successors[state, pick]
            words.append(f"w{state}")
        cut = min(max(1, round(len(words) * rng.uniform(0.2, 0.6))), len(words) - 1)
        rows.append({"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                  {"role": "assistant", "content": " ".join(words[cut:])}]})  # fmt: skip
    return rows


def protocol_config(shape: str, work: Path, *, method: str, steps: int, lengths: str = "alpaca",
                    micro_batch_size: int = 16, grad_accum: int = 6) -> Path:  # fmt: skip
    """The model folder, the data and a tunelab config for ``steps`` optimizer steps of the
    protocol in ``work``; returns the config's path. About 16k real tokens a step at Alpaca-like
    lengths (16 x 6 sequences of ~185 tokens); LoRA r 16, alpha 16, all linear layers."""
    import yaml

    folder = work / f"model-{shape}"
    if not (folder / "config.json").exists():
        build_model(shape, folder)
    rows = conversations(steps * micro_batch_size * grad_accum, SHAPES[shape]["vocab_size"],
                         lengths=lengths)  # fmt: skip
    data = work / f"{lengths}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = {"name": "lora", "r": 16, "alpha": 16, "targets": "all-linear"}
    cfg = {
        "model": {"name": str(folder)},
        "method": lora if method == "lora" else {"name": "full"},
        "data": {"path": str(data), "val_path": None, "val_ratio": 0.0, "prompt_loss_weight": 0.0,
                 "max_seq_len": LENGTHS[lengths][3]},
        "train": {"epochs": 1, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
                  "lr": 2e-4 if method == "lora" else 2e-5, "output_dir": str(work / "runs")},
        "eval": {"at_end": False},
    }  # fmt: skip
    out = work / f"protocol-{shape}-{method}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out
