"""Packing (train.packing): a micro-batch's sequences in one row, each attending only to itself.

The promise (RELIABILITY 8): each example's loss and gradient are those of unpacked training —
the packed row is the padded batch's arithmetic, only laid out differently."""

import numpy as np
import pytest
import torch

from tunelab.data.collate import collate, pack
from tunelab.data.tokenize import Encoded
from tunelab.models import attention as matmul
from tunelab.models import varlen
from tunelab.models.nll import causal_lm_nll_sum
from tunelab.testing import tiny_model, tiny_tokenizer
from tunelab.train.batches import StepPlan
from tunelab.train.speed import choose_packing


def _seq(rng, length, vocab, prompt=3):
    ids = rng.integers(5, vocab, size=length)
    weights = np.where(np.arange(length) < prompt, 0.1, 1.0).astype(np.float32)  # plw 0.1
    return Encoded(ids.astype(np.int64), weights, np.arange(length) >= prompt)


def _model(arch):
    tok = tiny_tokenizer()
    return tiny_model(tok, arch=arch), len(tok)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = causal_lm_nll_sum(model, batch.input_ids, batch.model_mask, batch.position_ids,
                             batch.loss_weights, documents=(batch.cu_seqlens, batch.max_len))  # fmt: skip
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_grads(got, want):
    """Equal up to fp32 summation order: 1e-4 relative, 1e-6 of the tensor's largest entry."""
    for name, g in want.items():
        atol = 1e-6 * max(1.0, g.abs().max().item())
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=atol, msg=name)


def test_a_packed_row_is_the_sequences_back_to_back():
    rng = np.random.default_rng(0)
    seqs = [_seq(rng, n, 50) for n in (5, 3, 4)]
    b = pack(seqs)
    assert b.input_ids.shape == (1, 12) and b.packed and b.model_mask is None
    assert b.input_ids[0].tolist() == [int(t) for s in seqs for t in s.input_ids]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert b.num_tokens == 12  # no padding
    starts = b.loss_weights[0, [0, 5, 8]]
    assert starts.tolist() == [0.0, 0.0, 0.0]  # nothing before a sequence predicts its first token
    assert b.loss_weights[0, 1].item() == pytest.approx(0.1)
    moved = b.to("cpu")
    assert moved.packed and torch.equal(moved.input_ids, b.input_ids)
    assert collate(seqs, 0).model_mask is not None


def test_a_packed_row_is_filled_to_a_multiple_by_its_last_sequence():
    """bf16 on a CPU pads widths to a multiple of 32: the filling joins the last sequence (no
    extra document), weighs nothing, is masked out of the token count and comes after every
    real token, so no one attends to it."""
    seqs = [_seq(np.random.default_rng(0), n, 50) for n in (5, 3, 4)]
    b = pack(seqs, pad_id=1, pad_to=8)
    assert b.input_ids.shape == (1, 16) and b.input_ids[0, 12:].tolist() == [1] * 4
    assert b.attention_mask[0].tolist() == [1] * 12 + [0] * 4 and b.num_tokens == 12
    assert b.loss_weights[0, 12:].tolist() == [0.0] * 4
    assert b.position_ids[0, 8:].tolist() == list(range(8))  # the last sequence, counting on
    assert b.cu_seqlens.tolist() == [0, 5, 8, 16] and b.max_len == 8
    assert pack(seqs, pad_to=4).input_ids.shape == (1, 12)  # already a multiple: nothing added


def test_the_gathered_layout_puts_each_token_in_its_documents_slot():
    layout = varlen.gathered(torch.tensor([0, 5, 8, 12], dtype=torch.int32))
    w = varlen.GATHER_WIDTH
    assert layout.width == w and layout.allowed.shape == (3, 1, w, w)
    slots = layout.slots.view(3, w)
    assert slots[0, :5].tolist() == [0, 1, 2, 3, 4] and set(slots[0, 5:].tolist()) == {0}
    assert slots[1, :3].tolist() == [5, 6, 7] and set(slots[1, 3:].tolist()) == {5}
    assert layout.back.tolist() == [0, 1, 2, 3, 4, w, w + 1, w + 2, 2 * w, 2 * w + 1, 2 * w + 2,
                                    2 * w + 3]  # fmt: skip
    owners = layout.owners.view(3, w)
    assert owners[1, :3].tolist() == [5, 6, 7] and set(owners[1, 3:].tolist()) == {12}
    seen = layout.allowed[1, 0]
    assert seen[1].tolist()[:4] == [True, True, False, False]  # causal
    assert seen[10].tolist()[:4] == [True, True, True, False]  # padding query: real keys only
    assert torch.equal(layout.slots[layout.back], torch.arange(12))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("widest", [None, 8])
def test_gathered_rows_filled_to_a_multiple_train_as_the_padded_batch(monkeypatch, widest, arch):
    """On a CPU a packed row's attention runs gathered by document (the grouped matmuls) — or,
    past the widest row they may take, SDPA per document — with the same loss and gradients
    as the padded batch, the row's filling and a sliding window (gemma3) included."""
    model, vocab = _model(arch)
    rng = np.random.default_rng(4)
    seqs = [_seq(rng, n, vocab) for n in (11, 4, 13, 6, 1)]
    model.set_attn_implementation("eager")
    padded_loss, padded_grads = _loss_and_grads(model, collate(seqs, 0, pad_to_multiple_of=16))
    varlen.register()
    model.set_attn_implementation(varlen.NAME)
    calls = {"gathered": 0, "by_document": 0}
    for name in calls:
        monkeypatch.setattr(varlen, f"_{name}", _counted(getattr(varlen, f"_{name}"), calls, name))
    if widest is not None:
        monkeypatch.setattr(varlen, "MATMUL_MAX_LEN", widest)
    packed_loss, packed_grads = _loss_and_grads(model, pack(seqs, 0, pad_to=16))
    assert calls["gathered" if widest is None else "by_document"] > 0 and 0 in calls.values()
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    _assert_same_grads(packed_grads, padded_grads)


def _counted(fn, calls, name):
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return counted


def test_the_tiny_gemma3s_sliding_window_changes_its_loss():
    """The sliding-window cases below test something: documents longer than the window
    train differently with it than without it."""
    model, vocab = _model("gemma3")
    rng = np.random.default_rng(1)
    batch = collate([_seq(rng, n, vocab) for n in (9, 4, 13, 6)], 0)
    windowed = _loss_and_grads(model, batch)[0]
    model.config.sliding_window = 64  # longer than any of the sequences
    for layer in model.model.layers:
        layer.self_attn.sliding_window = layer.self_attn.sliding_window and 64
    assert _loss_and_grads(model, batch)[0].item() != pytest.approx(windowed.item(), rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", matmul.NAME, varlen.NAME])
def test_packed_loss_and_gradients_equal_the_padded_batch(arch, attention):
    model, vocab = _model(arch)
    rng = np.random.default_rng(1)
    seqs = [_seq(rng, n, vocab) for n in (9, 4, 13, 6)]
    model.set_attn_implementation("eager")
    padded_loss, padded_grads = _loss_and_grads(model, collate(seqs, 0))
    varlen.register()
    matmul.register()
    model.set_attn_implementation(attention)
    packed_loss, packed_grads = _loss_and_grads(model, pack(seqs))
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    _assert_same_grads(packed_grads, padded_grads)


@pytest.mark.parametrize("attention", ["eager", matmul.NAME, varlen.NAME])
def test_a_sequence_in_a_packed_row_does_not_see_its_neighbours(attention):
    """Change every token of the sequence before it: its loss and gradient stay the same."""
    model, vocab = _model("llama")
    varlen.register()
    matmul.register()
    model.set_attn_implementation(attention)
    rng = np.random.default_rng(2)
    mine, before, other = _seq(rng, 8, vocab), _seq(rng, 6, vocab), _seq(rng, 6, vocab)
    silent = [Encoded(s.input_ids, np.zeros_like(s.weights), s.response) for s in (before, other)]
    results = [_loss_and_grads(model, pack([s, mine])) for s in silent]
    model.set_attn_implementation("eager")
    alone = _loss_and_grads(model, collate([mine], 0))
    for loss, grads in results:
        assert loss.item() == pytest.approx(alone[0].item(), rel=1e-5)
        _assert_same_grads(grads, alone[1])


class _Objective:
    def __init__(self, can_pack, name="sft"):
        self.can_pack, self.name = can_pack, name


LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
             intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def test_auto_packs_only_where_the_padding_costs_more_than_the_longer_rows():
    sft = _Objective(True)
    even = StepPlan([100] * 64, micro_batch_size=4, grad_accum=2, seed=0)
    assert choose_packing("auto", sft, even, LLAMA, False)[0] is False  # nothing to remove
    ragged = StepPlan([20, 20, 20, 400] * 16, micro_batch_size=4, grad_accum=2, seed=0,
                      group_by_length=False)  # fmt: skip
    packs, why = choose_packing("auto", sft, ragged, LLAMA, False)
    assert packs and "packing: auto: on" in why
    assert choose_packing("off", sft, ragged, LLAMA, False) == (False, "")
    assert choose_packing("on", sft, even, LLAMA, False)[0] is True
    assert choose_packing("auto", _Objective(False, "dpo"), ragged, LLAMA, False)[0] is False
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="train.packing"):
        choose_packing("on", _Objective(False, "dpo"), even, LLAMA, False)


def test_with_a_varlen_kernel_auto_packs_wherever_padding_is_left():
    """By document, a packed row costs its real tokens: Alpaca-like lengths (PERFORMANCE.md's
    lognormal) pack even after tunelab sorts each window by length; through a dense mask they
    do not; equal lengths never do (nothing to remove)."""
    sft = _Objective(True)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(140), 0.75, size=400), 16, 1024).astype(int).tolist()
    alpaca = StepPlan(lengths, micro_batch_size=4, grad_accum=2, seed=0)
    assert choose_packing("auto", sft, alpaca, LLAMA, False)[0] is False
    packs, why = choose_packing("auto", sft, alpaca, LLAMA, False, by_document=True)
    assert packs and "varlen attention" in why
    even = StepPlan([100] * 64, micro_batch_size=4, grad_accum=2, seed=0)
    assert choose_packing("auto", sft, even, LLAMA, False, by_document=True)[0] is False
    # ... unless the widths are padded to a multiple (bf16 on a CPU): 4 x 128 against 416
    packs, why = choose_packing("auto", sft, even, LLAMA, False, by_document=True, pad_to=32)
    assert packs and "packed rows 81%" in why, why
    assert choose_packing("auto", sft, even, LLAMA, False, pad_to=32)[0] is False  # dense mask
    # a CPU (the gathered matmuls) packs only where padding is far larger
    assert choose_packing("auto", sft, even, LLAMA, False, True, 32, "cpu")[0] is False
    assert choose_packing("auto", sft, alpaca, LLAMA, False, True, 32, "cpu")[0] is False
    ragged = StepPlan([20, 20, 20, 400] * 16, micro_batch_size=4, grad_accum=2, seed=0,
                      group_by_length=False)  # fmt: skip
    assert choose_packing("auto", sft, ragged, LLAMA, False, True, 32, "cpu")[0] is True


def test_documents_are_found_where_the_positions_restart():
    cu, longest = varlen.documents(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    b = pack([_seq(np.random.default_rng(3), n, 50) for n in (5, 3, 4)])
    assert b.cu_seqlens.tolist() == [0, 5, 8, 12] and b.max_len == 5
    assert torch.equal(varlen.documents(b.position_ids)[0], b.cu_seqlens)
    assert b.to("cpu").cu_seqlens.tolist() == [0, 5, 8, 12]


def test_varlen_attention_refuses_a_padded_batch():
    q = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="one packed row"):
        varlen.varlen_attention(None, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]))
