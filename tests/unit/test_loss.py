"""RELIABILITY 1 (exact gradient accumulation), 2 (the loss is what the docs say), 7 (padding)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import chat
from tunelab.data.collate import collate
from tunelab.data.tokenize import EncodeOptions, encode
from tunelab.testing import tiny_model, tiny_tokenizer
from tunelab.train.loop import accumulate
from tunelab.train.objectives.sft import SFT


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer("chatml")
    examples = [
        chat(
            "Q" + " word" * (3 + 5 * i),
            "A" + " answer" * (1 + (7 * i) % 11),
            system="sys" if i % 2 else None,
        )
        for i in range(8)
    ]
    seqs = [t.seq for t in encode(examples, tok, EncodeOptions(prompt_loss_weight=0.1)).examples]
    assert len({len(s) for s in seqs}) > 4  # really variable lengths
    return tok, seqs


def grads_after(model, batches):
    model.zero_grad(set_to_none=True)
    loss = accumulate(model, SFT(), batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_is_exact(setup):
    tok, seqs = setup
    model = tiny_model(tok)
    pad = tok.pad_token_id
    loss_a, grads_a = grads_after(model, [collate(seqs, pad)])  # 8 x GA 1
    loss_b, grads_b = grads_after(
        model, [collate(seqs[i : i + 2], pad) for i in range(0, 8, 2)]
    )  # 2 x GA 4
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_naive_mean_of_means_would_differ(setup):
    """Guard the guard: the per-micro-batch mean (the Oct-2024 bug) gives another loss here."""
    tok, seqs = setup
    model = tiny_model(tok)
    obj = SFT()
    batches = [collate(seqs[i : i + 2], tok.pad_token_id) for i in range(0, 8, 2)]
    with torch.no_grad():
        exact = accumulate_no_grad(model, batches)
        naive = sum(float(obj.loss_sum(model, b)) / obj.weight(b) for b in batches) / len(batches)
    assert abs(exact - naive) > 1e-4


def accumulate_no_grad(model, batches):
    obj = SFT()
    return sum(float(obj.loss_sum(model, b)) for b in batches) / sum(obj.weight(b) for b in batches)


def test_logged_loss_is_weighted_token_nll_over_summed_weights(setup):
    tok, seqs = setup
    model = tiny_model(tok)
    batch = collate(seqs[:3], tok.pad_token_id)
    model.zero_grad()
    logged = accumulate(model, SFT(), [batch])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    num = den = 0.0
    for b, s in enumerate(seqs[:3]):  # by hand, token by token
        logp = torch.log_softmax(logits[b].double(), -1)
        for t in range(1, len(s)):
            w = float(s.weights[t])
            num += w * -float(logp[t - 1, int(s.input_ids[t])])
            den += w
    assert logged == pytest.approx(num / den, rel=1e-5)
    assert math.isfinite(logged) and logged > 0


def test_prompt_weight_changes_gradient_only_through_prompt_tokens(setup):
    tok, _ = setup
    model = tiny_model(tok)
    ex = [chat("a question here", "the answer")]
    g = {}
    for plw in (0.0, 1.0):
        seq = encode(ex, tok, EncodeOptions(prompt_loss_weight=plw)).examples[0].seq
        model.zero_grad()
        batch = collate([seq], tok.pad_token_id)
        SFT().loss_sum(model, batch).backward()  # the summed loss: no normalisation
        g[plw] = model.lm_head.weight.grad.clone()
        if plw == 0.0:  # only reply tokens contribute: recompute with prompt targets masked by hand
            model.zero_grad()
            batch.loss_weights = batch.loss_weights * torch.from_numpy(seq.response).float()
            SFT().loss_sum(model, batch).backward()
            torch.testing.assert_close(model.lm_head.weight.grad, g[0.0], atol=0, rtol=0)
    assert not torch.equal(g[0.0], g[1.0])


def test_padding_invariance(setup):
    tok, seqs = setup
    model = tiny_model(tok)
    short = min(seqs, key=len)
    longer = sorted(seqs, key=len)[-2:]
    obj = SFT()
    with torch.no_grad():
        alone = float(obj.loss_sum(model, collate([short], tok.pad_token_id)))
        batch = collate([short, *longer], tok.pad_token_id)
        batch.loss_weights[1:] = 0
        together = float(obj.loss_sum(model, batch))
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_chunked_head_equals_full_logits(setup, arch):
    """The memory-saving path (decoder + chunked, recomputed head) gives the plain loss and grads."""
    from tunelab.models.nll import split_head, weighted_nll_sum

    tok, seqs = setup
    model = tiny_model(tok, arch=arch)
    assert split_head(model) is not None
    batch = collate(seqs[:4], tok.pad_token_id)
    model.zero_grad()
    chunked = SFT(chunk=7).loss_sum(model, batch)
    chunked.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    plain = weighted_nll_sum(out.logits, batch.input_ids, batch.loss_weights)
    plain.backward()
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, atol=5e-6, rtol=1e-4, msg=n)  # softmax rounding


def test_chunked_head_with_lora_on_the_head(setup):
    from peft import LoraConfig, get_peft_model

    tok, seqs = setup
    model = get_peft_model(
        tiny_model(tok),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    batch = collate(seqs[:3], tok.pad_token_id)
    chunked = SFT(chunk=5).loss_sum(model, batch)
    chunked.backward()
    head_grad = model.base_model.model.lm_head.lora_A["default"].weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    with torch.no_grad():
        from tunelab.models.nll import weighted_nll_sum

        plain = weighted_nll_sum(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                 batch.input_ids, batch.loss_weights)  # fmt: skip
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_head_equals_the_checkpointed_head(softcap, head_trains):
    """The fused head (gradient computed in the forward pass, nothing recomputed) gives the loss
    and the gradients of hidden and head weight that autograd gives through the chunked head."""
    from tunelab.models.nll import FusedHeadNLL, chunked_head_nll_sum, fused_head_nll_sum

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 101, bias=False).requires_grad_(head_trains)
    targets, weights = torch.randint(0, 101, (37,)), torch.rand(37)
    weights[::5] = 0
    grads = []
    for fn in (chunked_head_nll_sum, fused_head_nll_sum):
        hidden.grad = head.weight.grad = None
        loss = fn(hidden, head, softcap, targets, weights, 8)
        (loss * 2.0).backward()
        grads.append((loss.detach(), hidden.grad, head.weight.grad))
    (l1, h1, w1), (l2, h2, w2) = grads
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6)
    if head_trains:
        torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-6)
    else:
        assert w2 is None
    # it is the fused path that ran, and under bf16 autocast it stays within bf16's rounding
    calls = []
    original = FusedHeadNLL.forward
    FusedHeadNLL.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_head_nll_sum(hidden, head, softcap, targets, weights, 8)
        loss.backward()
    finally:
        FusedHeadNLL.forward = original
    assert calls and loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), l1, rtol=2e-2, atol=0)
    torch.testing.assert_close(hidden.grad * 2, h1, rtol=0.1, atol=2e-3)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_softmax_nll_blockwise_equals_autograd(block):
    """The head's blockwise fp32 pass: per-row NLL = cross-entropy, and its gradient =
    autograd's d(sum nll * scale)/d logits, whatever the block size (a last, shorter block too)."""
    from tunelab.models.nll import softmax_nll

    torch.manual_seed(1)
    logits = (torch.randn(10, 37) * 4).requires_grad_()
    targets, scale = torch.randint(0, 37, (10,)), torch.rand(10)
    want = F.cross_entropy(logits, targets, reduction="none")
    (want * scale).sum().backward()
    nll, grad = softmax_nll(
        logits.detach().clone(), targets, torch.float32, scale=scale, block=block
    )
    torch.testing.assert_close(nll, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)
    nll_only, none = softmax_nll(logits.detach().clone(), targets, None, block=block)
    assert none is None
    torch.testing.assert_close(nll_only, want.detach(), rtol=1e-6, atol=1e-6)
    # bf16 logits: the passes still run in fp32, the gradient comes back in the asked dtype
    nll16, grad16 = softmax_nll(logits.detach().bfloat16(), targets, torch.bfloat16, block=block)
    assert nll16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    exact = logits.detach().bfloat16().float()  # the same logits, the passes in fp32 throughout
    want16 = F.cross_entropy(exact.requires_grad_(), targets, reduction="none")
    want16.sum().backward()
    torch.testing.assert_close(nll16, want16.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad16.float(), exact.grad, rtol=1e-2, atol=1e-3)
    # bf16 logits, an fp32 gradient: a separate buffer, the same numbers
    _, grad32 = softmax_nll(logits.detach().bfloat16(), targets, torch.float32, block=block)
    torch.testing.assert_close(grad32, exact.grad, rtol=1e-5, atol=1e-7)
