"""Write a transformers causal LM as one GGUF file (llama.cpp's format) with the ``gguf``
package's writer: architecture metadata, tensors under llama.cpp's names, the tokenizer
(vocabulary, token types, merges, special ids) and the chat template.

Supported: the Llama family (Llama, Mistral, SmolLM — llama.cpp's ``llama`` architecture, whose
q/k rows it stores interleaved for its RoPE) and Qwen2 (``qwen2``, q/k/v biases, no
interleaving). transformers' own GGUF reader loads the file back (tests/unit/test_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunelab.errors import ModelError

#: model_type -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
GGUF_DTYPES = ("f32", "f16", "q8_0")
#: HF parameter name (after model.layers.N.) -> GGUF tensor name (after blk.N.)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
#: Gemma 3 normalises four times a layer (and q, k): its names where they differ
GEMMA3_TENSORS = {
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}  # fmt: skip
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # llama.cpp's token types


def write_gguf(
    model, tokenizer, path: Path, *, dtype: str = "f16", name: str = "model", pre: str = "default"
) -> None:
    """``model`` (a plain transformers causal LM, adapters merged) and its tokenizer as a GGUF
    file at ``path``; ``dtype``: f32, f16 or q8_0 for the matrices (norms and biases stay f32);
    ``pre``: llama.cpp's name for the tokenizer's pre-tokenizer (see :func:`source_pre`)."""
    import gguf

    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ModelError(
            f"GGUF export: model_type {config.model_type!r} is not supported yet "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, config, arch, name, dtype)
    _tokenizer(writer, tokenizer, config.vocab_size, pre)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embedding when output.weight is absent
        gguf_name = tensor_name(hf_name, arch)
        data = tensor.detach().float().cpu().numpy()
        if arch == "gemma3" and "norm" in gguf_name:
            data = data + 1.0  # HF Gemma scales by 1 + w; llama.cpp stores 1 + w
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads
            if gguf_name.endswith("attn_k.weight"):
                heads = getattr(config, "num_key_value_heads", None) or heads
            data = interleave_rope(data, heads)
        _add(writer, gguf, gguf_name, data, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_name(hf_name: str, arch: str = "llama") -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    names = {**LAYER_TENSORS, **GEMMA3_TENSORS} if arch == "gemma3" else LAYER_TENSORS
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in names:
        return f"blk.{parts[2]}.{names['.'.join(parts[3:])]}.{kind}"
    raise ModelError(f"GGUF export: no llama.cpp name for the tensor {hf_name!r}")


def interleave_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from transformers' RoPE layout (each head's first half, then
    second half) to llama.cpp's (the two halves interleaved)."""
    half = weight.shape[0] // heads // 2
    rows = weight.reshape(heads, 2, half, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _add(writer, gguf, name: str, data: np.ndarray, dtype: str) -> None:
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _metadata(writer, config, arch: str, name: str, dtype: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get(
        "full_attention", rope
    )  # Gemma 3: per attention type; GGUF holds the global one
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads or arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    writer.add_file_type(file_type)


def source_pre(model_folder: Path) -> str:
    """llama.cpp chooses its pre-tokenizer (the regex that splits text before BPE) by the name
    in ``tokenizer.ggml.pre``, which it assigns by hashing a tokenizer's output — a table
    tunelab does not copy. A model that came from a GGUF (the catalog's) keeps that file's
    name; any other gets "default" (llama.cpp's GPT-2 regex: close to, not always equal to, a
    Llama 3 or Qwen tokenizer on digits and punctuation)."""
    import gguf

    try:
        source = json.loads((model_folder / "tunelab_source.json").read_text())
    except (OSError, ValueError):
        return "default"
    if source.get("tokenizer_pre"):
        return str(source["tokenizer_pre"])
    try:  # converted before the name was recorded: the GGUF may still be there
        return str(gguf.GGUFReader(source["gguf"]).fields["tokenizer.ggml.pre"].contents())
    except (OSError, ValueError, KeyError, TypeError):
        return "default"


def _tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """A byte-level BPE tokenizer (Llama 3, Qwen, SmolLM) as llama.cpp's ``gpt2`` model; a
    SentencePiece-style one (Gemma: "▁" for spaces, byte-fallback tokens) as its ``llama``
    model, whose merges llama.cpp and transformers rebuild from the tokens' order."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ModelError(
            f"GGUF export: a {backend['model']['type']} tokenizer is not supported yet (BPE is)"
        )
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, len(vocab)))]
    for token, index in vocab.items():
        tokens[index] = token
    added = {t["content"]: t["special"] for t in backend.get("added_tokens", [])}
    types = [(CONTROL if added[t] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    writer.add_tokenizer_pre(pre)
    if "<0x00>" in vocab:  # SentencePiece-style
        types = [BYTE if _is_byte(t) else kind for t, kind in zip(tokens, types, strict=True)]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types(types)
        writer.add_add_space_prefix(False)
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_pad_token_id", tokenizer.pad_token_id), ("add_unk_token_id", tokenizer.unk_token_id)):  # fmt: skip
        if token_id is not None:
            getattr(writer, setter)(token_id)
    bos = tokenizer.bos_token_id  # does encoding put BOS first? (not every tokenizer says so)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _is_byte(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _is_byte(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")
