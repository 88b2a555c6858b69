"""Generation, the eval / baseline / compare commands, and evaluation at the end of training."""

import json
import re

import pytest
import torch

from tests.helpers import chat
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.evaluate.generate import GenerationOptions, generate
from tunelab.evaluate.run import conversation, load_eval_examples, pick_shots
from tunelab.testing import tiny_model, tiny_model_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path, n, start=0):
    rows = [
        {"messages": [{"role": "user", "content": f"Give the JSON for item {i} of colour c{i}"},
                      {"role": "assistant", "content": json.dumps({"item": i})}]}
        for i in range(start, start + n)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- generation --------------------------------------------------------------------------------
def test_batched_left_padded_generation_equals_one_at_a_time():
    tok = tiny_tokenizer("chatml")
    model = tiny_model(tok)
    convs = [[{"role": "user", "content": "Hi" + " there" * k}] for k in (0, 5, 11, 2)]
    options = GenerationOptions(max_new_tokens=8, batch_size=4)
    together = generate(model, tok, convs, options)
    alone = [
        generate(model, tok, [c], GenerationOptions(max_new_tokens=8, batch_size=1))[0]
        for c in convs
    ]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


def test_generation_stops_at_the_end_of_turn():
    tok = tiny_tokenizer("chatml")
    model = tiny_model(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> the only likely next token
        model.lm_head.weight.data.zero_()
        model.lm_head.weight.data[end] = 1.0
        model.model.embed_tokens.weight.data[end] = 1.0
    out = generate(
        model, tok, [[{"role": "user", "content": "Hi"}]], GenerationOptions(max_new_tokens=20)
    )
    assert out == [""]


# -- shots -------------------------------------------------------------------------------------
def test_shots_never_come_from_the_test_set_and_are_deterministic(tmp_path):
    train = load_eval_examples(write_jsonl(tmp_path / "train.jsonl", 20))
    test = load_eval_examples(
        write_jsonl(tmp_path / "test.jsonl", 10, start=15)
    )  # items 15-19 overlap
    for seed in range(20):
        shots = pick_shots(train, 3, seed, test)
        assert len(shots) == 3
        assert all(int(json.loads(s.response)["item"]) < 15 for s in shots)
    assert pick_shots(train, 3, 1, test) == pick_shots(train, 3, 1, test)
    with pytest.raises(Exception, match="only 15 training examples are usable"):
        pick_shots(train, 16, 0, test)


def test_k_shot_conversation_shape(tmp_path):
    train = load_eval_examples(write_jsonl(tmp_path / "train.jsonl", 5))
    ex = chat("the question", "the answer", system="be brief")
    msgs = conversation(ex, train[:2], "Answer in JSON.")
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0].content == "be brief\n\nAnswer in JSON." and msgs[-1].content == "the question"


# -- the commands ------------------------------------------------------------------------------
def test_eval_writes_predictions_and_metrics(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 6)
    metric = tmp_path / "m.py"
    metric.write_text(
        "def score(prediction, reference, record):\n    return float(len(prediction) > 0)\n"
    )
    code = main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev"), "--name", "tiny",
                 "--metric", f"{metric}:score", "eval.max_new_tokens=5", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "ev" / "tiny"
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    meta = json.loads((folder / "metrics.json").read_text())
    assert len(records) == 6 and meta["examples"] == 6
    assert {
        "exact_match",
        "json_equal",
        "bleu",
        "rouge1",
        "rougeL",
        "task",
        "loss",
        "perplexity",
    } <= meta["metrics"].keys()
    assert (
        records[0]["reference"] == '{"item": 0}'
        and "prediction" in records[0]
        and "scores" in records[0]
    )
    assert meta["metrics"]["perplexity"] > 1


def test_bad_metric_fails_before_loading_the_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 3)
    code = main(
        ["eval", "./no/such/model", "--data", str(data), "--metric", "nosuchmodule_xyz:f", "-q"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nosuchmodule_xyz" in err and "Traceback" not in err


def test_baseline_needs_a_training_split_for_shots(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 3)
    code = main(["baseline", "--model", "./x", "--data", str(data), "--shots", "0,3"])
    assert code == 2 and "--train" in capsys.readouterr().err


def test_baseline_shots_seed_and_instruction_from_config_and_flags(tmp_path, model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", 16)
    test = write_jsonl(tmp_path / "test.jsonl", 3, start=100)
    pool, examples = load_eval_examples(train), load_eval_examples(test)

    def drawn(k, seed):
        return [str(s.source) for s in pick_shots(pool, k, seed, examples)]

    assert drawn(1, 5) != drawn(1, 0) and drawn(2, 5) != drawn(2, 0)  # the seed matters
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  shots: [1]\n  shot_seed: 5\n  instruction: Answer in JSON.\n")

    def baseline(out, *args):
        code = main(["baseline", "--model", str(model_dir), "--data", str(test), "--train", str(train),
                     "--out", str(tmp_path / out), "-c", str(cfg), "eval.max_new_tokens=2", "-q", *args])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        folders = sorted((tmp_path / out).iterdir())
        return [p.name for p in folders], [
            json.loads((p / "metrics.json").read_text()) for p in folders
        ]

    names, metas = baseline("config")
    assert names == ["base-1shot"]
    assert metas[0]["shot_sources"] == drawn(1, 5) and metas[0]["instruction"] == "Answer in JSON."
    names, metas = baseline(
        "flags", "--shots", "2", "--seed", "0", "--instruction", "Be brief ✓ 😀"
    )
    assert names == ["base-2shot"]
    assert metas[0]["shot_sources"] == drawn(2, 0) and metas[0]["instruction"] == "Be brief ✓ 😀"


def test_baseline_default_shots_need_a_training_split(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 3)
    code = main(["baseline", "--model", "./x", "--data", str(data)])  # eval.shots: [0, 3]
    assert code == 2 and "--train" in capsys.readouterr().err


def read_csv(path):
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f))


def test_eval_sheet_from_config_or_flag(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 3)
    on, off = tmp_path / "on.yaml", tmp_path / "off.yaml"
    on.write_text("eval:\n  sheet: true\n")
    off.write_text("eval:\n  sheet: false\n")

    def evaluate(name, *args):  # sampling hot: the random model writes text, not just ""
        code = main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev"), "--name", name,
                     "eval.max_new_tokens=8", "eval.do_sample=true", "eval.temperature=5", "-q", *args])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        return tmp_path / "ev" / name

    folder = evaluate("tiny", "-c", str(on))
    sheet, key = read_csv(folder / "rating_sheet.csv"), read_csv(folder / "rating_key.csv")
    assert sheet[0] == ["item", "prompt", "reference", "answer_A", "rating_A", "notes"]
    assert key == [["item", "A"], ["1", "tiny"], ["2", "tiny"], ["3", "tiny"]]
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prediction"] for r in records)
    rows = sorted(sheet[1:], key=lambda row: int(row[0]))
    assert [row[1:4] for row in rows] == [
        [r["prompt"], r["reference"], r["prediction"]] for r in records
    ]
    assert (evaluate("flag", "-c", str(off), "--sheet") / "rating_sheet.csv").is_file()
    assert not (evaluate("neither") / "rating_sheet.csv").exists()


def test_baseline_sheet_covers_every_shot_count(tmp_path, model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", 8)
    test = write_jsonl(tmp_path / "test.jsonl", 3, start=100)
    out = tmp_path / "base"
    code = main(["baseline", "--model", str(model_dir), "--data", str(test), "--train", str(train), "--shots", "0,1",
                 "--out", str(out), "eval.max_new_tokens=8", "eval.do_sample=true", "eval.temperature=5",
                 "eval.sheet=true", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    sheet, key = read_csv(out / "base-rating_sheet.csv"), read_csv(out / "base-rating_key.csv")
    assert sheet[0][3:5] == ["answer_A", "answer_B"] and key[0] == ["item", "A", "B"]
    predictions = {
        name: [json.loads(x)["prediction"] for x in (out / name / "predictions.jsonl").read_text().splitlines()]
        for name in ("base-0shot", "base-1shot")
    }  # fmt: skip
    assert predictions["base-0shot"] != predictions["base-1shot"]  # else the key is untestable
    behind = {row[0]: row[1:] for row in key[1:]}
    assert len(sheet) == 4 and all(sorted(b) == sorted(predictions) for b in behind.values())
    for row in sheet[1:]:
        item = int(row[0])
        assert row[3:5] == [predictions[name][item - 1] for name in behind[row[0]]]


def test_eval_rejects_text_records(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"text": "plain text"}\n')
    code = main(["eval", "./x", "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:1" in err and "cannot be evaluated by generation" in err


def test_baseline_train_eval_compare_end_to_end(tmp_path, model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", 16)
    test = write_jsonl(tmp_path / "test.jsonl", 6, start=100)
    code = main(["baseline", "--model", str(model_dir), "--data", str(test), "--train", str(train),
                 "--shots", "0,2", "--out", str(tmp_path / "base"), "eval.max_new_tokens=6", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    base = sorted((tmp_path / "base").iterdir())
    assert [p.name.split("-")[-1] for p in base] == ["0shot", "2shot"]
    shots_meta = json.loads((base[1] / "metrics.json").read_text())
    assert shots_meta["shots"] == 2 and all(
        s.startswith(str(train)) for s in shots_meta["shot_sources"]
    )
    cfg = load_config(None, [
        f"model.name={model_dir}", f"data.path={train}", "data.val_ratio=0.25", f"train.output_dir={tmp_path}",
        "name=run", "train.max_steps=2", "train.micro_batch_size=2", "method.r=4", f"eval.data={test}",
        "eval.at_end=true", f"eval.general_data={test}", "eval.max_new_tokens=6",
    ])  # fmt: skip
    from tunelab.workflow.finetune import finetune as run_training

    run = run_training(cfg, log=lambda *a: None)
    assert (run / "eval" / "finetuned" / "metrics.json").is_file()
    assert (run / "eval" / "general-before" / "metrics.json").is_file()
    assert "forgetting check" in (run / "summary.md").read_text()
    code = main(["eval", str(run), "--data", str(test), "--out", str(tmp_path / "ev"), "--name", "ft",
                 "eval.max_new_tokens=6", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    a = json.loads((run / "eval" / "finetuned" / "predictions.jsonl").read_text().splitlines()[0])
    b = json.loads((tmp_path / "ev" / "ft" / "predictions.jsonl").read_text().splitlines()[0])
    assert a["prediction"] == b["prediction"]  # the saved adapter reproduces the in-memory model
    code = main(
        [
            "compare",
            str(base[0]),
            str(base[1]),
            str(run / "eval" / "finetuned"),
            "--out",
            str(tmp_path / "cmp"),
            "--sheet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "exact_match" in out
    assert (tmp_path / "cmp" / "compare.md").is_file() and (
        tmp_path / "cmp" / "compare.html"
    ).is_file()
    assert (tmp_path / "cmp" / "rating_sheet.csv").is_file()


FLAKY_METRIC = """
def some(prediction, reference, record):
    if record["index"] in (1, 3):
        raise KeyError("no field " + str(record["index"]))
    return 1.0


def never(prediction, reference, record):
    raise ValueError("broken on purpose")
"""


def test_a_failing_metric_is_reported_and_one_that_never_ran_fails_eval(tmp_path, model_dir, capsys):  # fmt: skip
    data = write_jsonl(tmp_path / "test.jsonl", 6)
    (tmp_path / "m.py").write_text(FLAKY_METRIC)

    def evaluate(fn):
        code = main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev"), "--name", fn,
                     "--metric", f"{tmp_path / 'm.py'}:{fn}", "eval.max_new_tokens=2", "-q"])  # fmt: skip
        return code, capsys.readouterr().err

    code, err = evaluate("some")  # some failed: told, not an error
    assert code == 0, err
    assert f"some: your metric {tmp_path / 'm.py'}:some failed on 2 of 6 examples" in err
    assert "#1 (" in err and "KeyError: 'no field 1'" in err and "KeyError: 'no field 3'" in err
    code, err = evaluate("never")  # every one failed: the function is broken
    assert code == 2 and "Traceback" not in err
    assert "never: your metric" in err and "failed on 6 of 6 examples" in err
    assert "ValueError: broken on purpose" in err and "... and 3 more" in err
    assert "error: eval.metric" in err and "failed on every example (6 of 6)" in err
    folder = tmp_path / "ev" / "never"
    assert f"written to {folder}" in err
    meta = json.loads((folder / "metrics.json").read_text())  # written first, to be inspected
    assert meta["metrics"]["task"] is None and meta["metrics"]["task_failed"] == 6
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 6


def test_a_metric_that_never_ran_stops_baseline_after_writing_that_evaluation(tmp_path, model_dir, capsys):  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", 8)
    test = write_jsonl(tmp_path / "test.jsonl", 4, start=100)
    (tmp_path / "m.py").write_text(FLAKY_METRIC)

    def baseline(fn):
        out = tmp_path / fn
        code = main(["baseline", "--model", str(model_dir), "--data", str(test), "--train", str(train),
                     "--shots", "0,1", "--out", str(out), "--metric", f"{tmp_path / 'm.py'}:{fn}",
                     "eval.max_new_tokens=2", "-q"])  # fmt: skip
        return code, capsys.readouterr().err, sorted(p.name for p in out.iterdir())

    code, err, written = baseline("some")
    assert code == 0, err
    assert written == ["base-0shot", "base-1shot"]
    assert "base-0shot: your metric" in err and "base-1shot: your metric" in err
    assert err.count("failed on 2 of 4 examples") == 2 and "KeyError: 'no field 3'" in err
    code, err, written = baseline("never")
    assert code == 2 and "failed on every example (4 of 4)" in err and "Traceback" not in err
    assert written == ["base-0shot"]  # written, then stopped before the 1-shot evaluation


def test_prompt_hash_is_the_examples_own_turns_before_the_reply():
    from tunelab.evaluate.run import prompt_hash

    base = prompt_hash(chat("the question", "the answer", system="be brief"))
    assert prompt_hash(chat("the question", "another answer", system="be brief")) == base
    assert prompt_hash(chat("the question", "the answer", system="be long")) != base
    assert prompt_hash(chat("the question", "the answer")) != base
    assert prompt_hash(chat("another question", "the answer", system="be brief")) != base


def test_compare_aligns_one_test_file_named_relative_and_absolute(tmp_path, model_dir, capsys, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "test.jsonl", 5)
    for name, path in (("rel", "test.jsonl"), ("abs", str(data))):
        code = main(["eval", str(model_dir), "--data", path, "--out", "ev", "--name", name,
                     "eval.max_new_tokens=2", "-q"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    hashes = [
        [json.loads(x)["prompt_hash"] for x in (tmp_path / "ev" / n / "predictions.jsonl").read_text().splitlines()]
        for n in ("rel", "abs")
    ]  # fmt: skip
    assert hashes[0] == hashes[1] and len(set(hashes[0])) == 5
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes[0])
    code = main(["compare", "ev/rel", str(tmp_path / "ev" / "abs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^exact_match\s+5\s", out, re.MULTILINE)
    assert "different data files" not in out and "left out" not in out
    assert "# Comparison: 2 evaluations, 5 common examples" in (tmp_path / "ev" / "compare.md").read_text()  # fmt: skip


def test_compare_refuses_evaluations_whose_references_differ(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 4)
    out = tmp_path / "ev"

    def evaluate(name):
        code = main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--name", name,
                     "eval.max_new_tokens=2", "-q"])  # fmt: skip
        assert code == 0, capsys.readouterr().err

    evaluate("before")
    lines = data.read_text().splitlines()  # the test file is corrected in between: line 3
    row = json.loads(lines[2])
    row["messages"][1]["content"] = '{"item": 22}'
    data.write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")
    evaluate("after")
    code = main(["compare", str(out / "before"), str(out / "after")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err and captured.out == ""
    err = " ".join(captured.err.split())
    assert f"{out / 'after'}: 1 of the 4 examples it shares with the baseline before ({out / 'before'})" in err  # fmt: skip
    assert (
        f"e.g. {data}:3" in err and """before has '{"item": 2}', after has '{"item": 22}'""" in err
    )
    assert "--allow-different-references" in err
    assert not (out / "compare.md").exists()
    code = main(["compare", str(out / "before"), str(out / "after"), "--allow-different-references"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 common examples have different references in different evaluations" in captured.out
    assert "test files differ in content" in captured.out


@pytest.mark.parametrize("target", ["runs/missing", "./x", "runs/missing/"])
def test_eval_of_a_missing_path_fails_at_once_without_the_hub(target, tmp_path, capsys, monkeypatch):  # fmt: skip
    def hub(endpoint):
        raise AssertionError("a path was looked up on the hub")

    monkeypatch.setattr("tunelab.models.load._hub_unreachable", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    data = write_jsonl(tmp_path / "test.jsonl", 2)
    code = main(["eval", target, "--data", str(data), "-q"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert f"error: {target}: not found: no such folder or file" in err
    assert "catalog models: smollm2-135m-instruct" in err


def test_eval_of_a_hub_id_with_the_hub_unreachable_is_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tunelab.models.load._hub_unreachable", lambda e: "huggingface.co cannot be reached: no network")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "test.jsonl", 2)
    code = main(["eval", "someone/some-model", "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: someone/some-model: not a catalog model")
    assert "(huggingface.co cannot be reached: no network, and no cached copy)" in err


def test_http_judge_end_to_end(tmp_path, model_dir, capsys):
    from tests.fakes.openai_server import serve

    data = write_jsonl(tmp_path / "test.jsonl", 3)
    with serve(lambda request: "Fair attempt.\nScore: 6") as base_url:
        code = main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev"), "--name", "j",
                     "--judge-url", base_url, "--judge-model", "judge-1", "eval.max_new_tokens=4",
                     "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "ev" / "j" / "metrics.json").read_text())
    assert meta["metrics"]["judge"] == 6.0 and not meta["judge_failures"]


def test_failing_judge_is_reported_not_scored(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", 2)
    code = main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev"), "--name", "j",
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "x", "eval.max_new_tokens=4",
                 "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "judge failure" in err
    meta = json.loads((tmp_path / "ev" / "j" / "metrics.json").read_text())
    assert len(meta["judge_failures"]) == 2
    records = [
        json.loads(x)
        for x in (tmp_path / "ev" / "j" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(r["scores"]["judge"] is None for r in records)


def test_bad_eval_inputs_fail_before_training(tmp_path, model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    base = [f"model.name={model_dir}", f"data.path={train}", f"train.output_dir={tmp_path / 'out'}",
            "train.micro_batch_size=2", "eval.at_end=true"]  # fmt: skip
    code = main(["train", "-q", *base, f"eval.data={bad}"])
    assert code == 2 and f"{bad}:1: output: missing" in capsys.readouterr().err
    code = main(["train", "-q", *base, f"eval.data={train}", "eval.metric=no_such_mod_q:f"])
    assert code == 2 and "no_such_mod_q" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluation_honours_model_precision(tmp_path, model_dir, monkeypatch):
    """model.precision reaches the evaluated weights (given as an override); without it a
    model loads in auto precision (fp32 on a CPU)."""
    import torch

    from tunelab.cli import evaluate as cli_eval

    seen = []
    real = cli_eval.__dict__.get("_placement_override")

    def spy(cfg):
        settings = real(cfg)
        seen.append(settings.precision if settings else None)
        return settings

    monkeypatch.setattr(cli_eval, "_placement_override", spy)
    test = write_jsonl(tmp_path / "t.jsonl", 2)
    for extra in ([], ["model.precision=bf16"]):
        code = main(["eval", str(model_dir), "--data", str(test), "--out", str(tmp_path / "o"), "-q",
                     "eval.max_new_tokens=2", *extra])  # fmt: skip
        assert code == 0
    assert seen == [None, "bf16"]
    from tunelab.config.schema import ModelConfig
    from tunelab.evaluate.run import load_target

    loaded = load_target(str(model_dir), ModelConfig(precision="bf16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert next(load_target(str(model_dir)).model.parameters()).dtype == torch.float32


def test_a_metric_that_never_ran_fails_training_at_the_end_after_writing(
    tmp_path, model_dir, capsys
):
    """eval.at_end tells metric failures like `tunelab eval` does; a metric that failed on every
    example is an error (exit 2) once the run folder and the evaluation are complete."""
    train = write_jsonl(tmp_path / "train.jsonl", 8)
    test = write_jsonl(tmp_path / "test.jsonl", 3, start=100)
    (tmp_path / "m.py").write_text(FLAKY_METRIC)
    code = main(["train", "-q", f"model.name={model_dir}", f"data.path={train}", "data.val_ratio=0",
                 f"train.output_dir={tmp_path}", "name=r", "train.max_steps=1", "train.micro_batch_size=2",
                 f"eval.data={test}", "eval.at_end=true", f"eval.metric={tmp_path / 'm.py'}:never",
                 "eval.max_new_tokens=2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "finetuned: your metric" in err and "failed on every example (3 of 3)" in err
    run = tmp_path / "r"
    assert (run / "final").is_dir() and (run / "eval" / "finetuned" / "metrics.json").is_file()


def test_forgetting_check_before_is_the_base_model_on_either_path(tmp_path, model_dir, monkeypatch):
    """The forgetting check's "before" runs on the model in memory before the first step when
    training and evaluation share a precision, and on the base loaded after training when they do
    not (bf16 training on a CPU): the same model either way — never the trained one."""
    import tunelab.workflow.finetune as workflow

    train = write_jsonl(tmp_path / "train.jsonl", 16)
    general = write_jsonl(tmp_path / "general.jsonl", 6, start=100)
    probe, seen = torch.arange(2, 12)[None], {}
    original = workflow._general

    def spy(cfg, target, run_dir, name, *rest):  # the logits of the model each check evaluates
        with torch.no_grad():
            seen.setdefault(run_dir.name, {})[name] = target.model(input_ids=probe).logits.float()
        return original(cfg, target, run_dir, name, *rest)

    monkeypatch.setattr(workflow, "_general", spy)

    def run(name):
        cfg = load_config(None, [
            f"model.name={model_dir}", f"data.path={train}", f"train.output_dir={tmp_path}", f"name={name}",
            "train.max_steps=4", "train.lr=0.05", "train.micro_batch_size=4", "method.r=4",
            "eval.at_end=true", f"eval.general_data={general}", "eval.max_new_tokens=6",
        ])  # fmt: skip
        out = workflow.finetune(cfg, log=lambda *a: None)
        assert (out / "eval" / "general-before" / "metrics.json").is_file()
        assert "forgetting check" in (out / "summary.md").read_text()

    run("same")
    monkeypatch.setattr(workflow, "_same_precision", lambda cfg, plan: False)
    run("other")
    torch.testing.assert_close(seen["other"]["general-before"], seen["same"]["general-before"])
    assert not torch.allclose(
        seen["same"]["general-after"], seen["same"]["general-before"], atol=1e-3
    )
