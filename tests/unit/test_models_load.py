"""Model resolution, loading, GGUF conversion, fingerprints and the errors a user can cause.

Everything uses tiny random models built in-process; TUNELAB_HOME points into tmp_path."""

import json
import shutil
import sys

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.models import catalog
from tunelab.models.load import (
    NO_CUDA,
    gguf_folder,
    load_model,
    model_fingerprint,
    resolve_model,
)
from tunelab.testing import tiny_model, tiny_model_dir, tiny_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The hub as resolve_model sees it, without a network: ``hub.down = "why"`` makes it
    unreachable; an empty cache in tmp_path (``hub.cache``); loading from it is forbidden."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM

    class Hub:
        down: str | None = None
        cache = tmp_path / "hf-cache"
        probes: list[str] = []

    def probe(endpoint):
        Hub.probes.append(endpoint)
        return Hub.down

    def forbidden(*args, **kwargs):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(Hub.cache))
    monkeypatch.setattr("tunelab.models.load._hub_unreachable", probe)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    return Hub


def logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([tok(text)["input_ids"]])).logits


def reference(kind="chatml", seed=0):
    tok = tiny_tokenizer(kind)
    model = tiny_model(tok, seed=seed)
    model.config._attn_implementation = "sdpa"  # what load_model asks for
    return model.eval(), tok


# -- loading a folder --------------------------------------------------------------------------
def test_folder_loads_the_saved_weights_and_tokenizer_exactly(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    model, tok = load_model(str(folder))
    ref, ref_tok = reference()
    assert resolve_model(str(folder)) == folder
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.chat_template == ref_tok.chat_template
    assert torch.equal(logits(model.eval(), tok), logits(ref, ref_tok))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_and_separate_tokenizer(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    other = tmp_path / "tok"
    tiny_tokenizer("llama3").save_pretrained(other)
    model, tok = load_model(str(folder), dtype=torch.bfloat16, tokenizer=str(other))
    assert model.dtype == torch.bfloat16
    assert tok.eos_token == "<|eot_id|>"


def test_missing_pad_token_becomes_eos(tmp_path):
    folder = tiny_model_dir(tmp_path / "m", kind="base")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_model(str(folder))
    assert tok.pad_token == tok.eos_token == "</s>"


# -- resolution and user errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["./no/such/model", "/no/such/dir", "~/no-such-model", "a/b/c", "./x", "missing/", "m.yaml"],
)
def test_missing_path_is_not_found(name, hub):
    with pytest.raises(ModelError, match="not found: no such folder or file") as e:
        load_model(name)
    assert str(e.value).startswith(f"{name}: ") and "smollm2-135m-instruct" in str(e.value)
    assert "is a folder here" not in str(e.value)  # spelled as a path: no other reason given
    assert hub.probes == []  # never a hub look-up


@pytest.mark.parametrize("name", ["runs/missing", "runs/missing/", "runs/a/b"])
def test_a_missing_path_under_a_local_folder_is_not_sent_to_the_hub(name, hub, tmp_path, monkeypatch):  # fmt: skip
    """``runs/missing`` has one slash like ``owner/name``: ``runs/`` existing here decides."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match="no such folder or file") as e:
        resolve_model(name)
    assert str(e.value).startswith(f"{name}: not found") and "gemma-3-270m" in str(e.value)
    if name == "runs/missing":  # the one spelling a hub id could have: say why it is a path
        assert "runs/ is a folder here, so this is read as a path, not a hub id" in str(e.value)
    assert hub.probes == []


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("runs/x", True),  # runs/ exists
        ("owner/x", False),
        ("gpt2", False),
        ("Qwen/Qwen2.5-0.5B", False),  # dots in a hub id are not a file suffix
        ("owner/x/", True),
        ("x/", True),
        ("a/b/c", True),
        ("./x", True),
        ("../x", True),
        ("/x", True),
        ("~/x", True),
        ("model.gguf", True),
        ("owner/model.safetensors", True),
        ("owner/config.json", True),
    ],
)
def test_looks_local(name, local, tmp_path, monkeypatch):
    from tunelab.models.load import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_local(name) is local


def test_missing_gguf_is_not_found(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_folder_without_config_names_what_it_holds(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as e:
        load_model(str(folder))
    assert "model.gguf, notes.txt" in str(e.value) and "to use the GGUF, pass" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="the folder is empty"):
        resolve_model(str(empty))


def test_a_file_that_is_not_gguf(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    with pytest.raises(ModelError, match="pass the folder that holds it"):
        resolve_model(str(folder / "config.json"))


def test_folder_without_weights(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(folder))


def test_hub_ids_are_left_to_the_hub(hub):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("gpt2") == "gpt2"
    assert len(hub.probes) == 2 and "huggingface" in hub.probes[0]
    with pytest.raises(ModelError, match="not found"):
        resolve_model("no such model")


def test_an_unreachable_hub_is_one_line_at_once_unless_it_has_a_cached_copy(hub):
    hub.down = "huggingface.co cannot be reached: [Errno -2] Name or service not known"
    with pytest.raises(ModelError) as e:
        load_model("someone/no-such-model")  # from_pretrained is never reached: no retries
    assert str(e.value) == (
        "someone/no-such-model: not a catalog model (smollm2-135m-instruct, gemma-3-270m), not a "
        "local folder or .gguf file, and the hub could not provide it (huggingface.co cannot be "
        "reached: [Errno -2] Name or service not known, and no cached copy)"
    )
    snapshot = hub.cache / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub.cache / "models--someone--cached" / "refs").mkdir()
    (hub.cache / "models--someone--cached" / "refs" / "main").write_text("abc123")
    assert resolve_model("someone/cached") == "someone/cached"  # the hub client uses the cache


def test_the_hub_probe(monkeypatch):
    """A TCP connection to the endpoint's host, once per process; a proxy is not probed."""
    import socket

    from tunelab.models.load import _hub_unreachable

    probe = _hub_unreachable.__wrapped__
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe(f"http://127.0.0.1:{port}") is None
    why = probe(f"http://127.0.0.1:{port}")  # closed now
    assert why.startswith("127.0.0.1 cannot be reached: ") and "\n" not in why
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert probe(f"http://127.0.0.1:{port}") is None


def test_unreachable_hub_id_lists_what_was_tried(offline):
    with pytest.raises(ModelError) as e:
        load_model("someone/no-such-model")
    msg = str(e.value)
    assert msg.startswith("someone/no-such-model: not a catalog model (smollm2-135m-instruct")
    assert "not a local folder or .gguf file" in msg and "the hub could not provide it" in msg


def test_catalog_name_resolves_to_its_converted_folder(tmp_path):
    name = "smollm2-135m-instruct"
    tiny_model_dir(catalog.hf_dir(name))  # as if pulled before: no download, no conversion
    assert catalog.is_converted(name)
    assert resolve_model(name) == catalog.hf_dir(name)
    model, tok = load_model(name)
    assert tok.chat_template is not None and model.config.vocab_size == len(tok)


# -- corrupt weights ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, found",
    [
        (lambda b: b"\x00\x01garbage", "header claims"),
        (lambda b: b[:5], "only 5 bytes"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: (20).to_bytes(8, "little") + b"{not json at all!!!}" + b[28:], "not a safetensors header"),
    ],
    ids=["garbage", "tiny", "truncated", "bad-header"],
)  # fmt: skip
def test_corrupt_safetensors_names_the_file(tmp_path, damage, found):
    folder = tiny_model_dir(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelError, match="not a valid safetensors file") as e:
        load_model(str(folder))
    assert str(weights) in str(e.value) and found in str(e.value)


# -- QLoRA -------------------------------------------------------------------------------------
def test_qlora_without_cuda_fails_before_loading_anything(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded something")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(catalog, "pull", forbidden)
    for bits in (4, 8):
        for name in ("smollm2-135m-instruct", str(tmp_path / "nothing-here")):
            with pytest.raises(ModelError) as e:
                load_model(name, quantize_bits=bits, device="cpu")
            assert str(e.value) == NO_CUDA and "method.name=lora" in str(e.value)


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelError, match="pip install bitsandbytes"):
        load_model("smollm2-135m-instruct", quantize_bits=4, device="cuda")


def test_quantising_on_the_cpu_needs_a_recent_bitsandbytes(monkeypatch):
    import types

    from tunelab.models.load import load_quantized

    old = types.SimpleNamespace(__version__="0.45.5")
    monkeypatch.setitem(sys.modules, "bitsandbytes", old)
    with pytest.raises(ModelError, match="0.48 or newer"):
        load_quantized("smollm2-135m-instruct", 4, dtype=torch.float32, device="cpu")


# -- fingerprint -------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_follows_the_weights(tmp_path, home):
    a = tiny_model_dir(tmp_path / "a")
    fp = model_fingerprint(str(a))
    assert len(fp) == 16 and model_fingerprint(str(a)) == fp
    assert (home / "fingerprints.json").is_file()  # the file hash is remembered
    shutil.copytree(a, tmp_path / "copy")
    assert model_fingerprint(str(tmp_path / "copy")) == fp  # content, not place
    other = tiny_model_dir(tmp_path / "b", seed=1)  # same config and sizes, other weights
    assert model_fingerprint(str(other)) != fp
    # rewriting the weights in place (same size) changes it; the cache does not hide that
    shutil.copy(other / "model.safetensors", a / "model.safetensors")
    assert model_fingerprint(str(a)) == model_fingerprint(str(other))
    cfg = json.loads((a / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (a / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(str(a)) != model_fingerprint(str(other))


def test_fingerprint_of_a_hub_id_is_its_name(hub):
    assert model_fingerprint("org/model") == model_fingerprint("org/model")
    assert model_fingerprint("org/model") != model_fingerprint("org/other")


# -- GGUF --------------------------------------------------------------------------------------
def write_tiny_gguf(path, tok, model):
    """Write a llama GGUF (float32 tensors, byte-level BPE tokenizer, chat template) the way
    llama.cpp's convert_hf_to_gguf.py lays it out, including its permutation of q and k."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(x, heads):
        return (
            x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:])
            .swapaxes(1, 2)
            .reshape(x.shape)
        )

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for gguf_name, hf_name in [
            ("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
        ]:  # fmt: skip
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{p}{hf_name}.weight"])
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(q, cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(k, cfg.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    ref, tok = reference()
    return write_tiny_gguf(tmp_path / "tiny.gguf", tok, ref), ref, tok


def test_gguf_converts_once_to_an_equivalent_folder(tiny_gguf, home, monkeypatch):
    path, ref, ref_tok = tiny_gguf
    model, tok = load_model(str(path))
    folder = resolve_model(str(path))
    assert folder == gguf_folder(path) and folder.parent == home / "gguf"
    assert folder.name.startswith("tiny-")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model.eval(), tok), logits(ref, ref_tok))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs) == ref_tok.apply_chat_template(msgs)
    assert [p.name for p in (home / "gguf").iterdir()] == [folder.name]  # no temp leftovers

    # later loads use the folder; the GGUF is not read again
    def forbidden(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(catalog, "convert_gguf", forbidden)
    assert load_model(str(path))[0].config.vocab_size == ref.config.vocab_size
    assert model_fingerprint(str(path)) == model_fingerprint(str(folder))


def test_interrupted_conversion_leaves_no_folder(tiny_gguf, home, monkeypatch):
    from transformers import PreTrainedModel

    path = tiny_gguf[0]

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(path))
    assert list((home / "gguf").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    assert (resolve_model(str(path)) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF" + b"\x00" * 64, b"not a gguf file at all"],
    ids=["empty", "zeros", "text"],
)
def test_corrupt_gguf_is_a_model_error(tmp_path, home, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match="not a usable GGUF model") as e:
        load_model(str(bad))
    assert str(bad) in str(e.value)
    assert not (home / "gguf").exists() or list((home / "gguf").iterdir()) == []


def test_tokenizer_of_a_gguf_is_read_directly_until_converted(tiny_gguf, home, monkeypatch):
    from tunelab.models.tokenizer import load_tokenizer

    path, _, ref_tok = tiny_gguf
    tok = load_tokenizer(str(path))  # data check: no conversion needed
    assert tok.get_vocab() == ref_tok.get_vocab() and not (home / "gguf").exists()
    resolve_model(str(path))
    monkeypatch.setattr("tunelab.models.tokenizer._from_gguf", None)  # now read from the folder
    assert load_tokenizer(str(path)).get_vocab() == ref_tok.get_vocab()
