"""`tunelab eval` on preference pairs: log-probabilities of chosen vs rejected, accuracy,
`tunelab compare` of two such evaluations, and refused inputs."""

import json
import math
import re

import pytest
import torch

from tunelab.cli import main
from tunelab.testing import tiny_model, tiny_model_dir, tiny_tokenizer

# Lengths vary both ways, so the summed and the length-normalised comparison disagree on some
# pairs; one prompt has a system message, one is multi-turn with an earlier assistant turn.
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.",
     "rejected": "The capital of France is Lisbon, a city by the sea."},
    {"prompt": "Translate to French: good morning.", "chosen": "Bonjour.", "rejected": "Good night."},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Count the rows."},
                {"role": "assistant", "content": "Which table?"},
                {"role": "user", "content": "users"}],
     "chosen": "SELECT count(*) FROM users;", "rejected": "42"},
    {"prompt": "Extract the name as JSON: Maria Lopez, 34", "chosen": '{"name": "Maria Lopez"}',
     "rejected": "Maria"},
    {"prompt": "Summarise the text in one sentence.",
     "chosen": "The quick brown fox jumps over the lazy dog.", "rejected": "fox"},
    {"prompt": "What is 2 + 2?", "chosen": "4",
     "rejected": "The answer is five, because two and two make five."},
    {"prompt": "Name a city.", "chosen": "Lisbon", "rejected": "Paris"},
    {"prompt": "Say hello.", "chosen": "Hello, how are you today?", "rejected": "Bye."},
]  # fmt: skip


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def swapped(pairs):
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


def evaluate(model, data, out, name, capsys, *args):
    code = main(["eval", str(model), "--data", str(data), "--out", str(out), "--name", name,
                 "eval.batch_size=3", "-q", *args])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    folder = out / name
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    return records, json.loads((folder / "metrics.json").read_text()), captured.err


def plain_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir).float().eval()


def independent_logps(tok, model, pair):
    """(summed log-probability, answer tokens) of chosen and of rejected, from a plain
    full-logits forward: the answer is what the chat template adds after the generation
    prompt, up to and including the <|im_end|> that closes it."""
    prompt = pair["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    head = ids(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    out = []
    for answer in (pair["chosen"], pair["rejected"]):
        full = ids(tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False))  # fmt: skip
        assert full[: len(head)] == head
        tail = full[len(head) :]
        tail = tail[: tail.index(end) + 1]
        seq = torch.tensor([head + tail])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, :-1].double(), dim=-1)
        picked = logp[torch.arange(seq.shape[1] - 1), seq[0, 1:]]
        out.append((float(picked[len(head) - 1 :].sum()), len(tail)))
    return out


# -- (a) the numbers ----------------------------------------------------------------------------
def test_pair_logps_match_an_independent_forward_and_accuracy_follows(tmp_path, model_dir, capsys):  # fmt: skip
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    records, meta, err = evaluate(model_dir, data, tmp_path / "ev", "tiny", capsys)
    assert len(records) == len(PAIRS) and meta["examples"] == len(PAIRS)
    assert meta["kind"] == "preference" and (tmp_path / "ev" / "tiny" / "metrics.json").is_file()
    tok, model = plain_model(model_dir)
    mean_right, sum_right = [], []
    for i, (r, pair) in enumerate(zip(records, PAIRS, strict=True)):
        (c, nc), (rj, nr) = independent_logps(tok, model, pair)
        assert r["index"] == i and r["source"] == f"{data}:{i + 1}"
        assert (r["tokens_chosen"], r["tokens_rejected"]) == (nc, nr)
        assert r["logp_chosen"] == pytest.approx(c, abs=1e-4)
        assert r["logp_rejected"] == pytest.approx(rj, abs=1e-4)
        mean_right.append(float(c / nc > rj / nr))
        sum_right.append(float(c > rj))
        assert r["scores"] == {"preference_accuracy": mean_right[-1], "preference_accuracy_sum": sum_right[-1]}  # fmt: skip
        assert r["reference"] == pair["chosen"] and r["rejected"] == pair["rejected"]
        assert r["prediction"] == (pair["chosen"] if mean_right[-1] else pair["rejected"])
        assert re.fullmatch(r"[0-9a-f]{16}", r["prompt_hash"])
    assert len({r["prompt_hash"] for r in records}) == len(PAIRS)  # each pair's own prompt
    assert mean_right != sum_right  # the data tells the two metrics apart
    m = meta["metrics"]
    assert m["preference_accuracy"] == pytest.approx(sum(mean_right) / len(PAIRS))
    assert m["preference_accuracy_sum"] == pytest.approx(sum(sum_right) / len(PAIRS))
    for name in ("preference_accuracy", "preference_accuracy_sum"):
        lo, hi = m[f"{name}_ci95"]
        assert 0 <= lo <= m[name] <= hi <= 1 and lo < hi
        assert re.search(rf"{name} {m[name]:.3f} \[{lo:.3f}, {hi:.3f}\]", err)
    assert f"tiny: {len(PAIRS)} pairs, " in err
    assert m["ties"] == 0
    assert m["margin_sum"] == pytest.approx(
        sum(r["logp_chosen"] - r["logp_rejected"] for r in records) / len(PAIRS)
    )


# -- (b) swapping -------------------------------------------------------------------------------
def test_swapping_chosen_and_rejected_flips_every_score(tmp_path, model_dir, capsys):
    out = tmp_path / "ev"
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    flipped = write_pairs(tmp_path / "swapped.jsonl", swapped(PAIRS))
    records, meta, _ = evaluate(model_dir, data, out, "as-is", capsys)
    records_s, meta_s, _ = evaluate(model_dir, flipped, out, "swapped", capsys)
    assert meta["metrics"]["ties"] == 0
    for r, s in zip(records, records_s, strict=True):
        assert s["logp_chosen"] == pytest.approx(r["logp_rejected"], abs=1e-4)
        assert s["scores"] == {k: 1.0 - v for k, v in r["scores"].items()}
    for name in ("preference_accuracy", "preference_accuracy_sum"):
        assert meta_s["metrics"][name] == pytest.approx(1.0 - meta["metrics"][name])


def uniform_model_dir(path):
    """A tiny model whose every next-token distribution is uniform (zero output head, tied to
    zero embeddings): log p of any token is -log V, so the answers of every pair tie per token
    and the shorter answer wins on the sum."""
    tok = tiny_tokenizer("chatml")
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model.config.vocab_size


def test_ties_are_no_preference_and_the_sum_favours_the_shorter_answer(tmp_path, capsys):
    model, vocab = uniform_model_dir(tmp_path / "uniform")
    out = tmp_path / "ev"
    for name, pairs in (("as-is", PAIRS), ("swapped", swapped(PAIRS))):
        data = write_pairs(tmp_path / f"{name}.jsonl", pairs)
        records, meta, _ = evaluate(model, data, out, name, capsys)
        shorter = 0
        for r in records:
            assert r["logp_chosen"] == pytest.approx(-r["tokens_chosen"] * math.log(vocab), abs=1e-4)  # fmt: skip
            assert r["logp_rejected"] == pytest.approx(-r["tokens_rejected"] * math.log(vocab), abs=1e-4)  # fmt: skip
            assert r["scores"]["preference_accuracy"] == 0.0  # a tie prefers neither
            assert r["prediction"] == r["rejected"]
            win = r["tokens_chosen"] < r["tokens_rejected"]
            assert r["scores"]["preference_accuracy_sum"] == float(win)
            shorter += win
        assert 0 < shorter < len(PAIRS)
        m = meta["metrics"]
        assert m["ties"] == len(PAIRS) and m["preference_accuracy"] == 0.0
        assert m["preference_accuracy_ci95"] == [0.0, 0.0]
        assert m["preference_accuracy_sum"] == pytest.approx(shorter / len(PAIRS))


# -- (c) compare --------------------------------------------------------------------------------
def test_compare_two_pair_evaluations(tmp_path, model_dir, capsys):
    other = tiny_model_dir(tmp_path / "seed1", seed=1)
    out = tmp_path / "ev"
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    evaluate(model_dir, data, out, "seed0", capsys)
    evaluate(other, str(data.resolve()), out, "seed1", capsys)  # another spelling of the path
    code = main(["compare", str(out / "seed0"), str(out / "seed1")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    n = len(PAIRS)
    interval = r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]"
    for name in ("preference_accuracy", "preference_accuracy_sum"):
        assert re.search(rf"^{name}\s+{n}\s+\d\.\d{{3}}\s+\d\.\d{{3}}\s+{interval}", captured.out, re.MULTILINE), captured.out  # fmt: skip
    assert "left out" not in captured.out and "different references" not in captured.out
    assert (out / "compare.md").is_file() and (out / "compare.html").is_file()


# -- (d) refused inputs -------------------------------------------------------------------------
def test_a_mixed_file_is_refused_before_any_weight_is_read(tmp_path, model_dir, no_weights_read, capsys):  # fmt: skip
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    out = tmp_path / "ev"
    for rows, line, first in (([*PAIRS[:2], chat, PAIRS[2]], 3, "a preference pair"),
                              ([chat, PAIRS[0], chat], 2, "a chat record")):  # fmt: skip
        data = write_pairs(tmp_path / "mixed.jsonl", rows)
        code = main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "-q"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "Traceback" not in err
        assert f"{data}:{line}: format:" in err and f"the file starts with {first} (line 1)" in err
        assert "either preference pairs" in err and "not both" in err
        assert err.count(f"{data}:") == 1  # only the odd record is named
        assert not out.exists()


def test_other_formats_keep_the_generation_refusal(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "plain text"}\n')
    code = main(["eval", "./x", "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:1" in err and "cannot be evaluated by generation" in err


def test_generation_settings_are_refused_for_pairs(tmp_path, model_dir, no_weights_read, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:2])
    code = main(["eval", str(model_dir), "--data", str(data), "--metric", "m.py:score", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.metric" in err and "preference pairs" in err
