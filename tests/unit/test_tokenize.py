"""RELIABILITY 3 (prompt loss weight), 4 (EOS), 5 (masks), 6 (template parity), 9 (truncation)."""

import numpy as np
import pytest

from tests.helpers import as_dicts, chat, reference_ids
from tunelab.data.collate import collate
from tunelab.data.tokenize import EncodeOptions, encode
from tunelab.errors import DataError

MULTI = chat(
    "What is the capital of France?", "Paris.", "And of Spain?", "Madrid, of course.",
    system="You are a helpful assistant.",
)  # fmt: skip


def enc(tokenizer, example, **kw):
    report = encode([example], tokenizer, EncodeOptions(**kw))
    return report.examples[0].seq


def trained_text(tokenizer, seq):
    return tokenizer.decode(seq.input_ids[seq.weights == 1.0].tolist())


# -- 6: template parity, one BOS --------------------------------------------------------------
def test_ids_equal_apply_chat_template(tokenizer):
    seq = enc(tokenizer, MULTI)
    ref = reference_ids(tokenizer, MULTI)
    ours = seq.input_ids.tolist()
    assert ours == ref[: len(ours)]
    # The only difference allowed: whitespace the template writes after the final EOS.
    assert tokenizer.decode(ref[len(ours) :]).strip() == ""


def test_exactly_one_bos(tokenizer):
    seq = enc(tokenizer, MULTI).input_ids.tolist()
    bos = tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    expected = rendered.count(tokenizer.bos_token)
    # The template decides where BOS goes; we never add another one.
    assert seq[:2] != [bos, bos]
    if tokenizer.bos_token not in ("<|im_start|>",):  # ChatML's BOS is the turn opener
        assert seq.count(bos) == expected == 1


def test_llama3_kind_adds_bos_twice_when_tokenized_naively():
    """The test tokenizer can show a double BOS: like Llama 3's, its template writes BOS and its
    post-processor prepends another one when special tokens are added."""
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer("llama3")
    bos = tok.bos_token_id
    text = tok.apply_chat_template(as_dicts(MULTI), tokenize=False)
    assert text.startswith(tok.bos_token)
    assert tok(text)["input_ids"][:3].count(bos) == 2  # the naive way: two BOS
    assert tok("plain text")["input_ids"][0] == bos  # the post-processor adds BOS to any text
    assert reference_ids(tok, MULTI).count(bos) == 1  # apply_chat_template: one


@pytest.fixture
def llama3():
    from tunelab.testing import tiny_tokenizer

    return tiny_tokenizer("llama3")


def test_one_bos_with_a_bos_adding_post_processor(llama3):
    bos = llama3.bos_token_id
    for ex in (MULTI, chat("  padded question  ", "  padded answer  ")):  # fast and prefix paths
        ids = enc(llama3, ex).input_ids.tolist()
        assert ids == reference_ids(llama3, ex)
        assert ids.count(bos) == 1 and ids[0] == bos


def test_preference_pair_has_one_bos_each(llama3):
    from tunelab.data.read import Source
    from tunelab.data.records import Example, Message

    ex = Example(Source("p.jsonl", 1), "preference", [Message("user", "Capital of France?")],
                 chosen="Paris.", rejected="Lyon.")  # fmt: skip
    tex = encode([ex], llama3, EncodeOptions()).examples[0]
    for seq, reply in ((tex.seq, "Paris."), (tex.rejected, "Lyon.")):
        ref = reference_ids(llama3, chat("Capital of France?", reply))
        assert seq.input_ids.tolist() == ref and ref.count(llama3.bos_token_id) == 1


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_a_preference_answer_is_the_final_reply_only(tokenizer, train_on):
    """Earlier assistant turns of a multi-turn prompt are prompt: a preference objective scores
    the answer being judged, whatever data.train_on says for SFT."""
    from tunelab.data.read import Source
    from tunelab.data.records import Example, Message

    turns = [Message("user", "Hi"), Message("assistant", "Hello there."), Message("user", "2+3?")]
    ex = Example(Source("p.jsonl", 1), "preference", turns, chosen="Five.", rejected="Six.")
    kto = Example(Source("k.jsonl", 1), "kto", [*turns, Message("assistant", "Five.")], label=True)
    tex, tkto = encode([ex, kto], tokenizer, EncodeOptions(train_on=train_on)).examples
    for seq, reply in ((tex.seq, "Five."), (tex.rejected, "Six."), (tkto.seq, "Five.")):
        answer = tokenizer.decode(seq.input_ids[seq.response]).strip()
        assert answer.startswith(reply) and "Hello" not in answer, answer


def test_text_format_gets_exactly_the_tokenizers_own_bos(tokenizer):
    from tunelab.data.read import Source
    from tunelab.data.records import Example

    text = "The quick brown fox."
    ex = Example(Source("t.jsonl", 1), "text", [], text=text)
    ids = enc(tokenizer, ex).input_ids.tolist()
    # What the tokenizer itself gives (its post-processor's BOS, if any), once, then EOS.
    assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    if tokenizer.bos_token == "<|begin_of_text|>":
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_truncate_prompt_keeps_one_bos(llama3):
    seq = enc(llama3, LONG, max_seq_len=30, truncation="truncate_prompt").input_ids.tolist()
    assert len(seq) == 30 and seq[0] == llama3.bos_token_id
    assert seq.count(llama3.bos_token_id) == 1


def test_saved_model_folder_keeps_the_post_processor(tmp_path):
    """A run tokenizes with the folder's tokenizer, loaded back: the post-processor survives
    and the data layer still writes one BOS."""
    from tunelab.config.schema import DataConfig
    from tunelab.data.pipeline import tokenize_examples
    from tunelab.models.tokenizer import load_tokenizer
    from tunelab.testing import tiny_model_dir

    tok = load_tokenizer(tiny_model_dir(tmp_path / "m", kind="llama3"))
    bos = tok.bos_token_id
    assert tok("x")["input_ids"][0] == bos
    seq = tokenize_examples([MULTI], tok, DataConfig()).examples[0].seq.input_ids.tolist()
    assert seq == reference_ids(tok, MULTI) and seq.count(bos) == 1


# -- 3: prompt loss weight ----------------------------------------------------------------------
@pytest.mark.parametrize("plw", [0.0, 0.1, 0.37, 1.0])
def test_prompt_loss_weight_scales_prompt_tokens_exactly(tokenizer, plw):
    seq = enc(tokenizer, MULTI, prompt_loss_weight=plw)
    prompt = ~seq.response
    assert seq.response.sum() > 0 and prompt.sum() > 0
    assert np.all(seq.weights[seq.response] == 1.0)
    assert np.all(seq.weights[prompt] == np.float32(plw))


def test_zero_prompt_weight_trains_only_the_replies(tokenizer):
    seq = enc(tokenizer, MULTI, prompt_loss_weight=0.0)
    nonzero = tokenizer.decode(seq.input_ids[seq.weights > 0].tolist())
    eos = tokenizer.eos_token
    assert nonzero == f"Paris.{eos}Madrid, of course.{eos}"


# -- 4: EOS ------------------------------------------------------------------------------------
def test_sequence_ends_in_trained_eos(tokenizer):
    seq = enc(tokenizer, MULTI)
    assert seq.input_ids[-1] == tokenizer.eos_token_id
    assert seq.weights[-1] == 1.0


def test_eos_is_trained_when_pad_equals_eos():
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    assert tok.pad_token_id == tok.eos_token_id
    seq = enc(tok, MULTI)
    batch = collate([seq, enc(tok, chat("Hi", "Hello"))], pad_id=tok.pad_token_id)
    row = batch.loss_weights[1]
    length = int(batch.attention_mask[1].sum())
    assert batch.input_ids[1, length - 1] == tok.eos_token_id
    assert row[length - 1] == 1.0  # the real EOS is trained ...
    assert (row[length:] == 0).all() and (
        batch.input_ids[1, length:] == tok.eos_token_id
    ).all()  # ... padding is not


def test_text_format_appends_eos(tokenizer):
    from tunelab.data.read import Source
    from tunelab.data.records import Example

    ex = Example(Source("t.jsonl", 1), "text", [], text="The quick brown fox.")
    seq = enc(tokenizer, ex)
    assert seq.input_ids[-1] == tokenizer.eos_token_id and np.all(seq.weights == 1.0)


# -- 5: masks follow the conversation ----------------------------------------------------------
def test_full_weight_tokens_are_exactly_the_assistant_turns(tokenizer):
    seq = enc(tokenizer, MULTI)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, seq) == f"Paris.{eos}Madrid, of course.{eos}"


def test_train_on_last_gives_earlier_replies_the_prompt_weight(tokenizer):
    seq = enc(tokenizer, MULTI, train_on="last", prompt_loss_weight=0.1)
    assert trained_text(tokenizer, seq) == f"Madrid, of course.{tokenizer.eos_token}"
    paris = tokenizer.encode("Paris.", add_special_tokens=False)
    ids = seq.input_ids.tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(paris)] == paris)
    assert np.all(seq.weights[start : start + len(paris)] == np.float32(0.1))


def test_message_weight_zero_is_not_trained(tokenizer):
    ex = chat("Q1", "bad answer", "Q2", "good answer", weights={1: 0.0})
    seq = enc(tokenizer, ex, prompt_loss_weight=0.1)
    assert trained_text(tokenizer, seq) == f"good answer{tokenizer.eos_token}"
    bad = tokenizer.encode("bad answer", add_special_tokens=False)
    ids = seq.input_ids.tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(bad)] == bad)
    assert np.all(seq.weights[start : start + len(bad)] == 0.0)


def test_all_replies_weight_zero_is_dropped_with_a_reason(tokenizer):
    ex = chat("Q1", "A1", weights={1: 0.0})
    with pytest.raises(DataError, match="no trained response token"):
        encode([ex], tokenizer, EncodeOptions())


def test_reply_repeated_in_the_prompt_is_located_in_its_own_turn(tokenizer):
    ex = chat("Say 'yes'", "yes", "Say it again", "yes")
    seq = enc(tokenizer, ex, prompt_loss_weight=0.0)
    eos = tokenizer.eos_token
    assert tokenizer.decode(seq.input_ids[seq.weights > 0].tolist()) == f"yes{eos}yes{eos}"


def test_template_that_rewrites_content_falls_back_to_prefix_rendering():
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer("llama3")  # its template trims content
    ex = chat("  padded question  ", "  padded answer  ")
    seq = enc(tok, ex, prompt_loss_weight=0.0)
    assert tok.decode(seq.input_ids[seq.weights > 0].tolist()) == f"padded answer{tok.eos_token}"
    assert seq.input_ids.tolist() == reference_ids(tok, ex)


# -- 9: truncation -----------------------------------------------------------------------------
LONG = chat("word " * 60, "short answer")


def test_drop_policy_counts_and_drops(tokenizer):
    short = chat("Hi", "Hello")
    limit = len(enc(tokenizer, short)) + 2
    report = encode([LONG, short], tokenizer, EncodeOptions(max_seq_len=limit, truncation="drop"))
    assert len(report.examples) == 1 and sum(report.dropped.values()) == 1
    assert report.examples[0].example is short
    assert f"max_seq_len {limit}" in next(iter(report.dropped))


def test_truncate_prompt_keeps_the_whole_response(tokenizer):
    full = enc(tokenizer, LONG)
    seq = enc(tokenizer, LONG, max_seq_len=30, truncation="truncate_prompt")
    assert len(seq) == 30
    n = int(full.response.sum())
    assert seq.response.sum() == n
    assert seq.input_ids[-n:].tolist() == full.input_ids[-n:].tolist()
    if tokenizer.bos_token_id == full.input_ids[0]:
        assert seq.input_ids[0] == tokenizer.bos_token_id


def test_truncate_never_yields_an_example_without_trained_tokens(tokenizer):
    prompt_len = int(enc(tokenizer, LONG).response.argmax())
    with pytest.raises(DataError, match="no trained token left after truncating"):
        encode([LONG], tokenizer, EncodeOptions(max_seq_len=prompt_len, truncation="truncate"))
    ok = chat("Hi", "a long answer " * 20)
    full = enc(tokenizer, ok)
    limit = int(full.response.argmax()) + 5  # the prompt and five reply tokens
    report = encode([ok], tokenizer, EncodeOptions(max_seq_len=limit, truncation="truncate"))
    seq = report.examples[0].seq
    assert len(seq) == limit and seq.response.sum() == 5 and report.truncated == 1
    assert seq.input_ids.tolist() == full.input_ids[:limit].tolist()


def test_response_longer_than_limit_is_dropped_under_truncate_prompt(tokenizer):
    ex = chat("Hi", "answer " * 50)
    with pytest.raises(DataError, match="response longer than max_seq_len"):
        encode([ex], tokenizer, EncodeOptions(max_seq_len=20, truncation="truncate_prompt"))


def test_error_policy_names_the_row(tokenizer):
    with pytest.raises(DataError, match=r"test.jsonl:1: .*max_seq_len 30"):
        encode([LONG], tokenizer, EncodeOptions(max_seq_len=30, truncation="error"))


# -- collate -----------------------------------------------------------------------------------
def test_collate_left_padding_and_positions(tokenizer):
    a, b = enc(tokenizer, MULTI), enc(tokenizer, chat("Hi", "Hello"))
    batch = collate(
        [a, b], pad_id=tokenizer.pad_token_id, padding_side="left", pad_to_multiple_of=8
    )
    width = batch.input_ids.shape[1]
    assert width % 8 == 0 and width >= len(a)
    assert batch.attention_mask[1, : width - len(b)].sum() == 0
    assert batch.position_ids[1, -len(b) :].tolist() == list(range(len(b)))
    assert batch.loss_weights[1, -len(b) :].tolist() == b.weights.tolist()
    assert batch.num_tokens == len(a) + len(b)


def test_fast_renderer_matches_apply_chat_template(tokenizer):
    from tunelab.data.render import Renderer, render

    r = Renderer(tokenizer)
    assert r._fast is not None  # the fast path is in use for ordinary templates
    tricky = chat("Quote: <|im_end|> </s> <|eot_id|>", "ok", system="s")
    for ex in (MULTI, tricky):
        for gen in (False, True):
            msgs = ex.messages if not gen else ex.messages[:-1]
            assert r(msgs, add_generation_prompt=gen) == render(
                tokenizer, msgs, add_generation_prompt=gen
            )
