"""Batched generation: chat-template prompts, left padding, KV cache, stop at the end of turn.

Prompts are rendered exactly as in training (the tokenizer's chat template with the generation
prompt, no extra special tokens), sorted by length so each batch pads little, generated with
``model.generate`` (which keeps a KV cache), and returned in the original order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tunelab.models.tokenizer import pad_id

#: Tokens that end an assistant turn in common templates (used when present in the vocabulary).
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in TURN_ENDS if t in vocab}
    return sorted(ids)


def encode_prompts(tokenizer, conversations: Sequence[list[dict]]) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    options: GenerationOptions = GenerationOptions(),
    on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The model's reply to each conversation (a list of {role, content} ending with the user)."""
    if not conversations:
        return []
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, conversations)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = pad_id(tokenizer)
    stops = stop_ids(tokenizer)
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    if options.do_sample:
        torch.manual_seed(options.seed)
    for start in range(0, len(order), options.batch_size):
        idx = order[start : start + options.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
        )
        if options.do_sample:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        if on_progress:
            on_progress(len(idx))
    if was_training:
        model.train()
    return out
