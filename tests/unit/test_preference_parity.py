"""Parity of the preference losses with TRL 1.16, the reference implementation.

(1) Identical log-probabilities (seeded, float64, to 1e-9): our per-pair losses against TRL's
loss code called unbound with a stand-in trainer ``self``: ``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``.
(2) One tiny model, the same tokens (float32, to 1e-5): ``normalise(loss_sum, weight)`` and its
gradients against TRL's loss by TRL's own log-prob path (fused LM head for DPO,
``concatenated_forward`` and ``get_batch_logps`` for ORPO and SimPO).

Where the papers and TRL could differ, we follow:
* IPO: log-ratios divided by the answer's token count (TRL's choice, confirmed with the IPO
  authors; the paper does not say);
* conservative DPO (label_smoothing > 0): −(1−ε) log σ(βΔ) − ε log σ(−βΔ), Mitchell's cDPO
  note (2023) and TRL's DPO ``sigmoid`` before 1.x. TRL 1.16's DPO ``sigmoid`` ignores
  label_smoothing, so we check the formula and TRL's CPO ``sigmoid``, which still applies it;
* KTO: z₀ from mismatched pairs, clamped at 0, without gradient (paper and TRL); SimPO: no SFT
  term (the paper; TRL's CPO with cpo_alpha=0), and TRL's γ/β inside β(·) is our γ;
* ORPO: mean token log-probabilities in the odds (TRL and the paper). TRL's NLL term runs
  over prompt and answer (as the ORPO authors' code): ours equals it at prompt_loss_weight=1;
  at 0 ours is the answer-only NLL, which is TRL CPO's NLL.
"""

import warnings
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")
with warnings.catch_warnings():  # trl.experimental warns that its API may change: we pin 1.16
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import add_fused_lm_head

from tunelab.config.schema import Config
from tunelab.data.read import Source
from tunelab.data.records import Example, Message
from tunelab.data.tokenize import EncodeOptions, encode
from tunelab.models.tokenizer import pad_id
from tunelab.testing import tiny_model, tiny_tokenizer
from tunelab.train.loop import normalise
from tunelab.train.objectives import get_objective
from tunelab.train.objectives.pairs import score

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
EXACT = dict(rtol=1e-9, atol=1e-9)  # float64 throughout (TRL's ORPO casts to float32: 1e-6)
TINY = dict(rtol=1e-5, atol=1e-5)  # float32 forward passes of a tiny model
PAIRS = [
    ("Capital of France?", "Paris is the capital of France.", "Lyon."),
    ("Translate to French: good morning.", "Bonjour.", "Good morning to you, my friend."),
    ("Count the rows.", "SELECT count(*) FROM users;", "0123456789"),
    ("What is the capital of France?", "Paris.", "The quick brown fox jumps over the dog."),
]


def objective(name, **preference):
    train = {"objective": name, "preference": preference}
    return get_objective(Config.model_validate({"train": train}))


def trainer(**attrs):
    """A stand-in for a TRL trainer's ``self``: only what its loss methods read."""
    same = lambda t: t  # noqa: E731  (one process: gathering is the identity)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same)
    base = dict(accelerator=accelerator, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
                _metrics=defaultdict(lambda: defaultdict(list)), model=SimpleNamespace(training=True))  # fmt: skip
    return SimpleNamespace(**{**base, **attrs})


def fixed_logps(table):
    """A stand-in model with TRL's fused head: fixed per-token log-probs for each input tensor."""

    def model(input_ids, labels, **kwargs):
        lp = table[id(input_ids)] * (labels[:, 1:] != -100)  # table: id(input_ids) -> [N, T-1]
        zero = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zero, mean_logits=zero, is_top1=zero.bool())

    return model


def random_answers(n, seed, width=14):
    """Per-token log-probs [n, T-1] and an answer mask [n, T] (a prompt first, varied lengths)."""
    g = torch.Generator().manual_seed(seed)
    per_token = -3 * torch.rand(n, width - 1, generator=g, dtype=torch.float64)
    start = torch.randint(1, width // 2, (n, 1), generator=g)
    end = torch.randint(width // 2 + 1, width + 1, (n, 1), generator=g)
    mask = (torch.arange(width) >= start) & (torch.arange(width) < end)
    sums, counts = (per_token * mask[:, 1:]).sum(-1), mask[:, 1:].sum(-1).double()
    return per_token, mask.long(), sums, counts, g


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_matches_trl(loss):
    per_token, mask, logps, counts, g = random_answers(16, seed=1)
    ref = logps + torch.randn(16, generator=g, dtype=torch.float64) * 4
    ours = objective("dpo", beta=0.2, dpo_loss=loss).pair_losses(logps, counts, ref, None)
    ids = torch.zeros_like(mask)
    self = trainer(beta=0.2, loss_types=[loss], loss_weights=[1.0], f_divergence_type="reverse_kl",
                   ld_alpha=None, precompute_ref_logps=True, use_weighting=False, label_smoothing=0.0)  # fmt: skip
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=ref[:8], ref_rejected_logps=ref[8:])  # fmt: skip
    theirs = DPOTrainer._compute_loss(self, fixed_logps({id(ids): per_token}), inputs, False)
    torch.testing.assert_close(ours.mean(), theirs, **EXACT)


def test_conservative_dpo_is_the_cdpo_formula_and_trl_cpo_sigmoid():
    _, _, logps, counts, g = random_answers(16, seed=2)
    ref = logps + torch.randn(16, generator=g, dtype=torch.float64) * 4
    ours = objective("dpo", beta=0.3, label_smoothing=0.1).pair_losses(logps, counts, ref, None)
    delta = (logps[:8] - ref[:8]) - (logps[8:] - ref[8:])
    cdpo = -0.9 * F.logsigmoid(0.3 * delta) - 0.1 * F.logsigmoid(-0.3 * delta)
    torch.testing.assert_close(ours, cdpo, **EXACT)
    self = trainer(beta=0.3, loss_type="sigmoid", label_smoothing=0.1, alpha=0.0)
    theirs, _, _ = CPOTrainer.cpo_loss(self, logps[:8] - ref[:8], logps[8:] - ref[8:])
    torch.testing.assert_close(ours, theirs, **EXACT)


@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_matches_trl_with_the_kl_clamped_at_zero(kl_sign):
    g = torch.Generator().manual_seed(3)
    logps, ref, ref_kl = (-20 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(3))
    kl_logps = ref_kl + kl_sign * (0.5 + 2 * torch.rand(8, generator=g, dtype=torch.float64))
    desirable = torch.tensor([True, False, True, True, False, True, False, False])
    obj = objective("kto", beta=0.1, desirable_weight=1.3, undesirable_weight=0.7)
    ours = obj.losses(logps, ref, kl_logps, ref_kl, desirable).sum() / 8
    ids, kl_ids, mask = (torch.zeros(8, 2, dtype=torch.long) for _ in range(3))
    mask[:, 1] = 1  # [prompt, one answer token]: the whole answer's log-prob in one token
    self = trainer(beta=0.1, loss_type="kto", calculate_KL=True, precompute_ref_logps=True,
                   desirable_weight=1.3, undesirable_weight=0.7)  # fmt: skip
    self._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, self)
    inputs = dict(input_ids=ids, attention_mask=mask, completion_mask=mask, label=desirable,
                  KL_input_ids=kl_ids, KL_attention_mask=mask, KL_completion_mask=mask,
                  ref_logps=ref, ref_KL_logps=ref_kl)  # fmt: skip
    model = fixed_logps({id(ids): logps[:, None], id(kl_ids): kl_logps[:, None]})
    theirs = KTOTrainer._compute_loss(self, model, inputs, False)
    torch.testing.assert_close(ours, theirs, **EXACT)
    kl = obj.pop_stats()["kl"]
    assert kl == pytest.approx(self._metrics["train"]["kl"][-1], abs=1e-6)
    assert (kl > 0.5) if kl_sign > 0 else (kl == 0)  # both sides of the clamp really ran


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_simpo(eps):
    _, _, logps, counts, _ = random_answers(16, seed=4)
    obj = objective("simpo", beta=2.5, simpo_gamma=1.4, label_smoothing=eps)
    ours = obj.pair_losses(logps, counts, None, None)
    mean = logps / counts  # CPO's get_batch_logps(average_log_prob=True) for simpo
    self = trainer(beta=2.5, loss_type="simpo", simpo_gamma=1.4, label_smoothing=eps, alpha=0.0)
    theirs, _, _ = CPOTrainer.cpo_loss(self, mean[:8], mean[8:])
    torch.testing.assert_close(ours, theirs, **EXACT)


def test_orpo_odds_ratio_matches_trl():
    _, _, logps, counts, _ = random_answers(16, seed=5)
    logps[0], logps[9] = -1e-3 * counts[0], -40.0 * counts[9]  # both branches of log1mexp
    ours = objective("orpo", orpo_lambda=0.25).pair_losses(logps, counts, None, None)
    mean = logps / counts
    theirs = ORPOTrainer.odds_ratio_loss(trainer(beta=0.25), mean[:8], mean[8:])[0]
    torch.testing.assert_close(ours, -theirs.double(), rtol=1e-6, atol=1e-6)  # TRL: float32


# ---- one tiny model, the same tokens, TRL's own log-prob path ----------------------------


def tiny_rows(obj, prompt_loss_weight=0.0):
    tok = tiny_tokenizer("chatml")
    examples = [Example(Source("pairs.jsonl", i + 1), "preference", [Message("user", p)],
                        chosen=c, rejected=r) for i, (p, c, r) in enumerate(PAIRS)]  # fmt: skip
    tokenized = encode(examples, tok, EncodeOptions(prompt_loss_weight=prompt_loss_weight))
    return tok, obj.collate(tokenized.examples, pad_id(tok))


def assert_same_loss_and_grads(ours, theirs, model):
    torch.testing.assert_close(ours, theirs, **TINY)
    params = [p for p in model.parameters() if p.requires_grad]
    for mine, trl_grad in zip(torch.autograd.grad(ours, params, retain_graph=True),
                              torch.autograd.grad(theirs, params), strict=True):  # fmt: skip
        torch.testing.assert_close(mine, trl_grad, **TINY)


def pair_batch(rows):
    """TRL's ORPO/CPO batch: chosen_* and rejected_*, labels −100 outside the answer."""
    b, half = rows.tokens, rows.tokens.input_ids.shape[0] // 2
    labels = b.input_ids.masked_fill(~rows.response, -100)
    parts = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels)
    return {f"{side}_{k}": v[rows_of] for k, v in parts.items()
            for side, rows_of in (("chosen", slice(0, half)), ("rejected", slice(half, None)))}  # fmt: skip


def pair_trainer(cls, **attrs):
    self = trainer(is_encoder_decoder=False, concatenated_inputs=cls.concatenated_inputs,
                   get_batch_logps=cls.get_batch_logps, **attrs)  # fmt: skip
    self.concatenated_forward = partial(cls.concatenated_forward, self)
    return self


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_on_a_tiny_model_matches_trl(loss):
    obj = objective("dpo", beta=0.5, dpo_loss=loss)
    tok, rows = tiny_rows(obj)
    policy, reference = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    with torch.no_grad():
        rows.ref = score(reference, rows)[0]  # precomputed, as tunelab caches them
    ours = normalise(obj.loss_sum(policy, rows), obj.weight(rows))
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)  # TRL scores the reference itself, by its own path
    self = trainer(beta=0.5, loss_types=[loss], loss_weights=[1.0], f_divergence_type="reverse_kl",
                   ld_alpha=None, precompute_ref_logps=False, use_weighting=False,
                   label_smoothing=0.0, model=policy, ref_model=reference,
                   args=SimpleNamespace(gradient_checkpointing_kwargs=None))  # fmt: skip
    inputs = dict(input_ids=rows.tokens.input_ids, attention_mask=rows.tokens.attention_mask,
                  completion_mask=rows.response.long())  # fmt: skip
    theirs = DPOTrainer._compute_loss(self, policy, inputs, False)
    assert_same_loss_and_grads(ours, theirs, policy)


@pytest.mark.parametrize("prompt_loss_weight", [1.0, 0.0])
def test_orpo_on_a_tiny_model_matches_trl(prompt_loss_weight):
    obj = objective("orpo", orpo_lambda=0.25)
    tok, rows = tiny_rows(obj, prompt_loss_weight)
    model = tiny_model(tok)
    ours = normalise(obj.loss_sum(model, rows), obj.weight(rows))
    batch = pair_batch(rows)
    self = pair_trainer(ORPOTrainer, beta=0.25, padding_value=pad_id(tok))
    self.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, self)
    theirs, _ = ORPOTrainer.get_batch_loss_metrics(self, model, batch)
    if prompt_loss_weight == 0.0:  # swap TRL ORPO's prompt+answer NLL for CPO's answer-only one
        cpo = pair_trainer(CPOTrainer, cpo_alpha=1.0, loss_type="sigmoid", pad_token_id=pad_id(tok))
        answer_nll = CPOTrainer.concatenated_forward(cpo, model, batch)[4]
        theirs = theirs - ORPOTrainer.concatenated_forward(self, model, batch)[4] + answer_nll
    assert_same_loss_and_grads(ours, theirs, model)


def test_simpo_on_a_tiny_model_matches_trl_cpo():
    obj = objective("simpo", beta=2.0, simpo_gamma=1.0)
    tok, rows = tiny_rows(obj)
    model = tiny_model(tok)
    ours = normalise(obj.loss_sum(model, rows), obj.weight(rows))
    self = pair_trainer(CPOTrainer, beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.0,
                        label_smoothing=0.0, alpha=0.0, pad_token_id=pad_id(tok))  # fmt: skip
    self.cpo_loss = partial(CPOTrainer.cpo_loss, self)
    theirs, _ = CPOTrainer.get_batch_loss_metrics(self, model, pair_batch(rows))
    assert_same_loss_and_grads(ours, theirs, model)
