"""Config wiring (RELIABILITY 3 and 9, end to end): every data setting that changes the loss
reaches the tokenizer from the command line.

Each test runs ``tunelab train`` for one step on the tiny model, with one micro-batch of one
example per accumulation step and as many accumulation steps as examples, so step 1 sees every
example exactly once and without padding. Its logged loss is computed before any update, so it
must equal the loss we compute here independently — the HF model's per-token NLL, weighted by
what the docs say each token is worth, from ``apply_chat_template`` renderings (never through
tunelab's data layer). A setting dropped anywhere between the config and the tokenizer gives
another number, and each test checks first that the number it would give is far from the one
expected.
"""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.integration.runs import losses
from tunelab.cli import main

CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris is the capital of France.")],
    [("system", "You are a helpful assistant."),
     ("user", "Translate to French: good morning."), ("assistant", "Bonjour."),
     ("user", "Summarise the text in one sentence, please."),
     ("assistant", "Good morning is bonjour in French.")],
    [("user", "Extract the name, age and city as JSON: Maria Lopez, 34, from Lisbon. "
              "Extract the name, age and city as JSON, please, then answer."),
     ("assistant", '{"name": "Maria Lopez", "age": 34, "city": "Lisbon"}')],
    [("user", "SELECT name FROM users WHERE age > 30"), ("assistant", "count the rows"),
     ("user", "then answer the question"), ("assistant", "0123456789 rows.")],
]  # fmt: skip
N = len(CONVERSATIONS)
TOLERANCE = 1e-6  # relative; measured agreement is ~1e-7 (fp32, batch size 1, no padding)
DEFAULT_PLW = 0.1  # what the loss would use if data.prompt_loss_weight were dropped


def messages(conv):
    return [{"role": r, "content": c} for r, c in conv]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("wiring") / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": messages(c)}) for c in CONVERSATIONS))
    return path


@dataclass
class Reference:
    tok: object
    model: torch.nn.Module
    rows: list  # per conversation: (ids, reply index of each token or -1, number of replies)

    def nll(self, ids):
        """NLL of each target (tokens 1..T-1) under the untrained model."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, :-1].float()
        return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


@pytest.fixture(scope="module")
def reference(model_dir):
    """The conversations' tokens and which reply each belongs to, and the untrained model —
    read with transformers alone, without tunelab."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for conv in CONVERSATIONS:
        msgs = messages(conv)
        ids = _strip_trailing_whitespace(tok, _ids(tok, msgs))
        owner = [-1] * len(ids)
        replies = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for k, i in enumerate(replies):
            head = _ids(tok, msgs[:i], add_generation_prompt=True)
            upto = _strip_trailing_whitespace(tok, _ids(tok, msgs[: i + 1]))
            assert ids[: len(upto)] == upto and upto[: len(head)] == head
            assert upto[-1] == tok.eos_token_id  # the reply's closing token is trained with it
            owner[len(head) : len(upto)] = [k] * (len(upto) - len(head))
        rows.append((ids, owner, len(replies)))
    return Reference(tok, model, rows)


def _ids(tok, msgs, **kw):
    got = tok.apply_chat_template(msgs, tokenize=True, **kw)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


def _strip_trailing_whitespace(tok, ids):
    """docs/data.md: our sequences end at the final closing token (ChatML writes a newline)."""
    while ids and not tok.decode(ids[-1]).strip():
        ids = ids[:-1]
    return ids


def expected_loss(ref: Reference, *, plw=DEFAULT_PLW, train_on="all", max_seq_len=None,
                  truncation="drop"):  # fmt: skip
    """The step's loss as docs/data.md and docs/training.md define it: the weighted NLL of
    every target of every example, summed, divided by the summed weights."""
    total, weight = 0.0, 0.0
    for ids, owner, replies in ref.rows:
        w = torch.tensor(
            [plw if k < 0 or (train_on == "last" and k != replies - 1) else 1.0 for k in owner]
        )
        if max_seq_len is not None and len(ids) > max_seq_len:
            if truncation == "drop":
                continue
            if truncation == "truncate":
                keep = list(range(max_seq_len))
            else:  # truncate_prompt: cut from the left, after a leading BOS
                head = [0] if ids[0] == ref.tok.bos_token_id else []
                keep = head + list(range(len(ids) - max_seq_len + len(head), len(ids)))
            ids, w = [ids[i] for i in keep], w[keep]
        total += float((w[1:] * ref.nll(ids)).sum())
        weight += float(w[1:].sum())
    return total / weight


def assert_distinct(want, *others):
    """The test can fail: the loss a dropped setting would give is far outside the tolerance."""
    for other in others:
        assert abs(want - other) > 50 * TOLERANCE * want, (want, other)


def train(tmp_path, model_dir, data, *overrides, examples=N):
    out = tmp_path / "runs"
    code = main([
        "train", "-q", f"model.name={model_dir}", f"data.path={data}", f"train.output_dir={out}",
        "name=run", "data.val_ratio=0", "method.name=full", "train.max_steps=1",
        "train.micro_batch_size=1", f"train.grad_accum={examples}", "train.eval_at_start=false",
        *overrides,
    ])  # fmt: skip
    assert code == 0
    run = out / "run"
    return run, losses(run)[0]["loss"], json.loads((run / "result.json").read_text())


def test_the_default_settings_give_the_expected_loss(tmp_path, model_dir, chats, reference):
    """The reference itself: with no data setting given, the logged loss is the documented
    one (prompt weight 0.1, every reply trained, nothing truncated)."""
    _, loss, result = train(tmp_path, model_dir, chats)
    assert result["train_examples"] == N and result["dropped"] == {}
    assert loss == pytest.approx(expected_loss(reference), rel=TOLERANCE)


# -- data.prompt_loss_weight -------------------------------------------------------------------
@pytest.mark.parametrize("plw", [0.0, 0.5])
def test_prompt_loss_weight_reaches_the_loss(tmp_path, model_dir, chats, reference, plw):
    want = expected_loss(reference, plw=plw)
    assert_distinct(want, expected_loss(reference))  # the loss if the setting were dropped
    _, loss, _ = train(tmp_path, model_dir, chats, f"data.prompt_loss_weight={plw}")
    assert loss == pytest.approx(want, rel=TOLERANCE)


# -- data.train_on -----------------------------------------------------------------------------
def test_train_on_last_reaches_the_loss(tmp_path, model_dir, chats, reference):
    want = expected_loss(reference, plw=0.0, train_on="last")
    assert_distinct(want, expected_loss(reference, plw=0.0))  # train_on dropped
    _, loss, _ = train(tmp_path, model_dir, chats, "data.train_on=last",
                       "data.prompt_loss_weight=0")  # fmt: skip
    assert loss == pytest.approx(want, rel=TOLERANCE)


# -- data.truncation and data.max_seq_len ------------------------------------------------------
def limit(reference):
    """A max_seq_len that the two longest conversations exceed by less than their prompts (so
    truncate_prompt cuts prompt tokens only) and that ends after their first reply starts (so
    truncate keeps trained tokens); test_limit_fits_the_policies checks both."""
    lengths = sorted(len(ids) for ids, *_ in reference.rows)
    return (lengths[1] + lengths[2]) // 2


def test_limit_fits_the_policies(reference):
    cut = limit(reference)
    long = [(ids, owner) for ids, owner, _ in reference.rows if len(ids) > cut]
    assert len(long) == 2
    for ids, owner in long:
        first = owner.index(0)
        assert first < cut  # truncate keeps part of the first reply
        assert first - 1 >= len(ids) - cut  # truncate_prompt removes prompt tokens only


def test_truncation_drop_reports_the_count(tmp_path, model_dir, chats, reference):
    cut = limit(reference)
    want = expected_loss(reference, max_seq_len=cut, truncation="drop")
    _, loss, result = train(tmp_path, model_dir, chats, f"data.max_seq_len={cut}",
                            "data.truncation=drop", examples=N - 2)  # fmt: skip
    assert result["train_examples"] == N - 2
    assert sum(result["dropped"].values()) == 2
    assert f"max_seq_len {cut}" in next(iter(result["dropped"]))
    assert loss == pytest.approx(want, rel=TOLERANCE)


@pytest.mark.parametrize("policy", ["truncate", "truncate_prompt"])
def test_truncation_policy_reaches_the_loss(tmp_path, model_dir, chats, reference, policy):
    cut = limit(reference)
    want = expected_loss(reference, max_seq_len=cut, truncation=policy)
    assert_distinct(
        want,
        expected_loss(reference),  # max_seq_len dropped
        expected_loss(reference, max_seq_len=cut, truncation="drop"),  # truncation dropped
        *[expected_loss(reference, max_seq_len=cut, truncation=other)  # the other policy
          for other in ("truncate", "truncate_prompt") if other != policy],
    )  # fmt: skip
    _, loss, result = train(tmp_path, model_dir, chats, f"data.max_seq_len={cut}",
                            f"data.truncation={policy}")  # fmt: skip
    assert result["train_examples"] == N and result["dropped"] == {}
    assert result["truncated"] == 2  # RELIABILITY 9: the number affected is reported
    assert loss == pytest.approx(want, rel=TOLERANCE)


def test_truncation_error_names_the_row(tmp_path, model_dir, chats, reference, capsys):
    cut = limit(reference)
    out = tmp_path / "runs"
    code = main([
        "train", "-q", f"model.name={model_dir}", f"data.path={chats}", f"train.output_dir={out}",
        "name=run", "data.val_ratio=0", f"data.max_seq_len={cut}", "data.truncation=error",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{chats}:2: " in err and f"max_seq_len {cut} (truncation: error)" in err
    assert not (out / "run").exists()
