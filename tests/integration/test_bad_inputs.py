"""RELIABILITY "Bad input", row by row, through the command line.

Every row is refused by ``tunelab train`` (and, for a data file, by ``tunelab data check``):
exit code 2, a message naming the file (and the line and field where the table says so) and
what was expected, no traceback, no run folder, and — where the mistake is in the data or the
config — no weight file read. A corrupt weight file can only be found by reading it: there the
error is checked, not the reading.
"""

import json
import shutil
from pathlib import Path

import pytest

from tunelab.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BAD = EXAMPLES / "bad"

# Messages are printed through rich with their own text escaped: a message holding "[...]"
# keeps it, one holding "[/x]" cannot break the output (the two cases marked below).


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """A fresh TUNELAB_HOME: a fingerprint hashed by an earlier test cannot hide a read of the
    weights, and GGUF conversions stay out of the user's cache."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, tmp_path, model, *overrides, config=None):
    """``tunelab train [CONFIG]`` with a run folder of its own: (exit code, stdout, stderr, the
    folder runs go to)."""
    runs = tmp_path / "runs"
    code, out, err = cli(
        capsys, "train", *([config] if config else []), "-q", f"model.name={model}",
        f"train.output_dir={runs}", "name=run", "train.micro_batch_size=2", "train.max_steps=1",
        *overrides,
    )  # fmt: skip
    return code, out, err, runs


def assert_refused(code, out, err, expected, runs=None):
    """Exit 2, every expected fragment in stderr, no traceback, and no run folder (not even an
    empty one)."""
    assert "Traceback" not in err + out, err
    assert code == 2, err
    assert err.startswith("error: "), err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    if runs is not None:
        assert not runs.exists(), sorted(runs.rglob("*"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- data files: refused while reading, before the tokenizer or any weight -----------------------
def _file(name, content):
    return (name, content)


GOOD_CHAT = (
    '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
)
DATA_ROWS = [
    # a malformed JSON/JSONL line: file:line and the parse error
    pytest.param(BAD / "malformed.jsonl", ["{file}:3: invalid JSON: Expecting ',' delimiter"],
                 id="malformed-jsonl-line"),
    pytest.param(_file("rows.json", '[{"text": "a"},\n {"text": }]'),
                 ["{file}:2: invalid JSON: Expecting value"], id="malformed-json-array"),
    pytest.param(_file("rows.csv", "instruction,output\nq,a,extra\n"),
                 ["{file}:2: more cells than header columns"], id="malformed-csv-row"),
    pytest.param(_file("rows.jsonl", GOOD_CHAT + "\n[1, 2]\n"),
                 ["{file}:2: expected a JSON object, found list"], id="line-not-an-object"),
    # an empty file
    pytest.param(BAD / "empty.jsonl", ["{file}: the file has no records (it is empty)"],
                 id="empty-file"),
    pytest.param(_file("blank.jsonl", "\n  \n\n"), ["{file}: the file has no records"],
                 id="blank-lines-only"),
    # missing or misspelt fields, unknown format: the row, the fields found, the formats expected
    pytest.param(BAD / "missing_field.jsonl",
                 ["{file}:2: output: missing (fields found: input, instruction, ouput); "
                  "did you mean 'ouput'?"], id="misspelt-field"),
    pytest.param(_file("rows.jsonl", '{"question_text": "q", "answer": "a"}'),
                 ["{file}:1: cannot tell the record format", "alpaca (instruction, output",
                  "chat (messages", "preference (prompt, chosen, rejected", "kto (instruction",
                  "text (text)", "answer, question_text"],
                 id="unknown-format"),
    pytest.param(_file("rows.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                                     '{"prompt": "q", "chosen": "a", "rejected": ""}'),
                 ["{file}:2: rejected: is empty"], id="empty-rejected"),
    # wrong types, unknown roles, empty content: a typed error naming the row
    pytest.param(_file("rows.jsonl", '{"instruction": 5, "output": "a"}'),
                 ["{file}:1: instruction: expected a string, got int"], id="wrong-type"),
    pytest.param(_file("rows.jsonl", '{"messages": "Hi"}'),
                 ["{file}:1: messages: expected a list of messages, got a string"],
                 id="messages-not-a-list"),
    pytest.param(BAD / "bad_role.jsonl",
                 ["{file}:2: messages[1].role: 'bot' is not a role "
                  "(expected one of: system, user, assistant)"], id="unknown-role"),
    pytest.param(_file("rows.jsonl", '{"messages": [{"role": "user", "content": "Hi"}, '
                                     '{"role": "[/b]", "content": "x"}]}'),
                 ["{file}:1: messages[1].role: '[/b]' is not a role"],
                 id="unknown-role-that-looks-like-markup"),
    pytest.param(_file("rows.jsonl", '{"messages": [{"role": "user", "content": " "}, '
                                     '{"role": "assistant", "content": "x"}]}'),
                 ["{file}:1: messages[0].content: is empty"], id="empty-content"),
    pytest.param(_file("rows.jsonl", '{"instruction": "5", "output": []}\n' + GOOD_CHAT +
                                     '\n{"text": 3}'),
                 ["{file}:1: output: expected a string, got a list",
                  "{file}:3: text: expected a string, got int"], id="every-bad-row-named"),
    # a conversation that does not end with the assistant
    pytest.param(BAD / "ends_with_user.jsonl",
                 ["{file}:1: messages: the conversation ends with a user message"],
                 id="ends-with-user"),
    # a preference row without chosen or rejected, a KTO tag that is not true/false
    pytest.param(BAD / "pref_missing.jsonl", ["{file}:1: rejected: missing"],
                 id="preference-without-rejected"),
    pytest.param(_file("rows.jsonl", '{"prompt": "q", "rejected": "b"}'),
                 ["{file}:1: chosen: missing"], id="preference-without-chosen"),
    pytest.param(BAD / "bad_kto.jsonl",
                 ["{file}:2: kto_tag: expected true or false, got 'maybe'"], id="kto-tag"),
    # non-UTF-8 bytes: the file and byte offset (latin1.jsonl's é is byte 141)
    pytest.param(BAD / "latin1.jsonl",
                 ["{file}:2: not valid UTF-8 at byte offset 141 (bytes e9"], id="not-utf8"),
]  # fmt: skip


def data_file(tmp_path, source) -> Path:
    """The row's file, in a folder of its own (a shipped example is copied there)."""
    name, content = (source.name, source.read_bytes()) if isinstance(source, Path) else source
    path = tmp_path / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("source, expected", DATA_ROWS)
def test_train_refuses_bad_data(tmp_path, capsys, model_dir, no_weights_read, source, expected):
    path = data_file(tmp_path, source)
    code, out, err, runs = train(capsys, tmp_path, model_dir, f"data.path={path}")
    assert_refused(code, out, err, [e.format(file=path) for e in expected], runs)


@pytest.mark.parametrize("source, expected", DATA_ROWS)
def test_data_check_refuses_bad_data(tmp_path, capsys, source, expected):
    path = data_file(tmp_path, source)
    before = tree(path.parent)
    code, out, err = cli(capsys, "data", "check", path)
    assert_refused(code, out, err, [e.format(file=path) for e in expected])
    assert tree(path.parent) == before  # nothing written next to the data


def test_the_utf8_offset_is_the_bad_byte():
    raw = (BAD / "latin1.jsonl").read_bytes()
    with pytest.raises(UnicodeDecodeError) as e:
        raw.decode("utf-8")
    assert e.value.start == 141 and raw[141:142] == b"\xe9" and raw.count(b"\n", 0, 141) == 1


def test_a_bom_and_blank_lines_are_fine(tmp_path, capsys, model_dir, no_weights_read):
    path = data_file(tmp_path, BAD / "bom_blank.jsonl")
    code, out, err, _ = train(capsys, tmp_path, model_dir, f"data.path={path}",
                              "data.val_ratio=0", "--dry-run")  # fmt: skip
    assert code == 0, err
    assert "3 train / 0 validation examples" in out


# -- found while tokenizing: the numbers, and why each group of rows was dropped -----------------
def _rows(*records):
    return "\n".join(json.dumps(r) for r in records)


LONG = {"instruction": "word " * 200, "output": "ok"}
SHORT = {"instruction": "Name a colour.", "output": "Red."}
GOOD = [{"instruction": f"Name colour number {i}.", "output": "Red."} for i in range(8)]
UNTRAINED = {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "weight": 0}]}  # fmt: skip
PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
KTO_GOOD = {"instruction": "What is 2 + 3?", "output": "5", "kto_tag": True}
TOKENIZE_ROWS = [
    # an empty file, or nothing left after filtering: why each row was dropped
    pytest.param(_rows(LONG, LONG, LONG), ["data.max_seq_len=32", "data.val_ratio=0"],
                 ["{file}: no example is left to train on (3 are longer than max_seq_len 32 "
                  "(truncation: drop))"], id="nothing-left-after-truncation"),
    pytest.param(_rows(LONG, UNTRAINED, LONG), ["data.max_seq_len=32", "data.val_ratio=0"],
                 ["{file}: no example is left to train on (2 are longer than max_seq_len 32 "
                  "(truncation: drop); 1 have no trained response token"],
                 id="nothing-left-for-two-reasons"),
    # fewer rows than one batch / than the split needs: the numbers
    pytest.param(_rows(*GOOD[:5]), ["train.micro_batch_size=8", "data.val_ratio=0"],
                 ["{file}: 5 usable training examples, fewer than one micro-batch "
                  "(train.micro_batch_size=8)"], id="fewer-than-a-batch"),
    pytest.param(_rows(SHORT, LONG, SHORT), ["data.max_seq_len=64", "data.val_ratio=0",
                                             "train.micro_batch_size=3"],
                 ["{file}: 2 usable training examples, fewer than one micro-batch "
                  "(train.micro_batch_size=3)"], id="fewer-than-a-batch-after-dropping"),
    pytest.param(_rows(SHORT), ["data.val_ratio=0.1", "train.micro_batch_size=1"],
                 ["{file}: 1 records (1 distinct prompts) cannot fill 2 splits with ratios "
                  "0.9/0.1: the val split would be empty; need at least 5 records"],
                 id="fewer-than-the-split-needs"),
    # records the objective cannot learn from (train.objective): refused, file:line:field
    pytest.param(_rows(*GOOD[:4]), ["train.objective=dpo", "data.val_ratio=0"],
                 ["{file}:1: format: this alpaca record cannot be trained with "
                  "train.objective=dpo: it needs preference records"], id="dpo-on-alpaca"),
    pytest.param(_rows(*[PAIR] * 4), ["train.objective=kto", "data.val_ratio=0"],
                 ["{file}:1: format: this preference record cannot be trained with "
                  "train.objective=kto: it needs kto records"], id="kto-on-pairs"),
    pytest.param(_rows(*[PAIR] * 4), ["data.val_ratio=0"],
                 ["{file}:1: format: a preference pair (prompt, chosen, rejected) cannot be "
                  "trained with train.objective=sft"], id="sft-on-pairs"),
    pytest.param(_rows(*[KTO_GOOD] * 4), ["train.objective=kto", "data.val_ratio=0"],
                 ["{file}: kto_tag: every record is tagged true (desirable): KTO needs both "
                  "kinds of answer"], id="kto-one-kind-only"),
    # over-long examples under truncation=error: the row and its length
    pytest.param(_rows(SHORT, LONG), ["data.max_seq_len=64", "data.truncation=error",
                                      "data.val_ratio=0"],
                 ["{file}:2: {tokens} tokens, more than max_seq_len 64 (truncation: error)"],
                 id="over-long-with-truncation-error"),
]  # fmt: skip


def long_tokens(model_dir) -> int:
    """LONG's length in tokens, from the tokenizer alone: the chat template's ids up to the
    closing token (docs/data.md)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    got = tok.apply_chat_template([{"role": "user", "content": LONG["instruction"]},
                                   {"role": "assistant", "content": LONG["output"]}])  # fmt: skip
    ids = list(got["input_ids"] if hasattr(got, "keys") else got)
    while not tok.decode(ids[-1]).strip():
        ids.pop()
    return len(ids)


@pytest.mark.parametrize("content, overrides, expected", TOKENIZE_ROWS)
def test_train_refuses_data_it_cannot_use(
    tmp_path, capsys, model_dir, no_weights_read, content, overrides, expected
):
    path = data_file(tmp_path, ("rows.jsonl", content))
    code, out, err, runs = train(capsys, tmp_path, model_dir, f"data.path={path}", *overrides)
    expected = [e.format(file=path, tokens=long_tokens(model_dir)) for e in expected]
    assert_refused(code, out, err, expected, runs)


def test_over_long_examples_dropped_are_counted(tmp_path, capsys, model_dir, no_weights_read):
    path = data_file(tmp_path, ("rows.jsonl", _rows(SHORT, LONG, SHORT, LONG, LONG)))
    code, out, err, runs = train(capsys, tmp_path, model_dir, f"data.path={path}", "--dry-run",
                                 "data.max_seq_len=64", "data.val_ratio=0")  # fmt: skip
    assert code == 0, err
    data = next(line for line in out.splitlines() if line.startswith("data "))
    assert "2 train / 0 validation examples (3 dropped" in data
    assert "longer than max_seq_len 64 (truncation: drop)" in data
    assert not runs.exists()


def test_duplicates_are_counted_and_dropped_on_request(
    tmp_path, capsys, model_dir, no_weights_read
):
    path = data_file(tmp_path, ("rows.jsonl", _rows(SHORT, SHORT, LONG, SHORT)))
    code, out, _ = cli(capsys, "data", "check", path, "--json")
    assert code == 0 and json.loads(out)["exact_duplicates"] == 2
    code, out, err, _ = train(capsys, tmp_path, model_dir, f"data.path={path}", "--dry-run",
                              "data.dedup=true", "data.val_ratio=0")  # fmt: skip
    assert code == 0 and "2 train / 0 validation examples" in out, err


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.jsonl"
    path.write_text(_rows(*GOOD))
    return path


# -- the config: the key, the allowed values (and the file and line for a YAML file) ---------------
CONFIG_ROWS = [
    pytest.param(None, ["data.path={data}", "data.max_len=5"],
                 ["override 'data.max_len=5': data.max_len: unknown key (allowed: path, val_path",
                  "did you mean 'max_seq_len'?"], id="unknown-key"),
    pytest.param(None, ["data.path={data}", "dataa.val_ratio=0"],
                 ["dataa: unknown key (allowed: ", "did you mean 'data'?"], id="unknown-section"),
    pytest.param(None, ["data.path={data}", "data.truncation=cut"],
                 ["data.truncation: 'cut' is not allowed (expected one of: 'drop', "
                  "'truncate_prompt', 'truncate', 'error')"], id="impossible-choice"),
    pytest.param(None, ["data.path={data}", "data.format=sharegpt"],
                 ["data.format: 'sharegpt' is not allowed (expected one of: 'auto', 'alpaca', "
                  "'chat', 'preference', 'kto', 'text')"], id="unknown-data-format"),
    pytest.param(None, ["data.path={data}", "data.prompt_loss_weight=2"],
                 ["data.prompt_loss_weight: input should be less than or equal to 1 (got 2)"],
                 id="impossible-number"),
    pytest.param(None, ["data.path={data}", "data.max_seq_len=0"],
                 ["data.max_seq_len: input should be greater than 0"], id="impossible-length"),
    pytest.param("data:\n  path: {data}\n  max_len: 5\n",
                 [], ["{config}:3: data.max_len: unknown key"], id="unknown-key-in-yaml"),
    pytest.param("data:\n  path: {data}\n  truncation: cut\n", [],
                 ["{config}:3: data.truncation: 'cut' is not allowed (expected one of:"],
                 id="impossible-value-in-yaml"),
    pytest.param("data:\n  path: [\n", [], ["{config}:3: invalid YAML"], id="invalid-yaml"),
    pytest.param(None, [], ["data.path: missing (the training data file)"], id="no-data-file"),
    pytest.param(None, ["data.path={missing}"], ["{missing}: data.path: file not found"],
                 id="data-file-not-found"),
]  # fmt: skip


@pytest.mark.parametrize("yaml, overrides, expected", CONFIG_ROWS)
def test_train_refuses_a_bad_config(
    tmp_path, capsys, model_dir, good_data, no_weights_read, yaml, overrides, expected
):
    names = dict(data=good_data, missing=tmp_path / "nope.jsonl", config=tmp_path / "run.yaml")
    config = None
    if yaml is not None:
        config = names["config"]
        config.write_text(yaml.format(**names))
    args = [o.format(**names) for o in overrides]
    code, out, err, runs = train(capsys, tmp_path, model_dir, *args, config=config)
    assert_refused(code, out, err, [e.format(**names) for e in expected], runs)


# -- the model: what was tried, what was found ----------------------------------------------------
def test_missing_model_path(tmp_path, capsys, good_data, no_weights_read):
    missing = tmp_path / "no" / "model"
    code, out, err, runs = train(capsys, tmp_path, missing, f"data.path={good_data}")
    assert_refused(code, out, err, [f"{missing}: not found: no such folder or file"], runs)


@pytest.fixture
def model_copy(tmp_path, model_dir):
    """A copy of the tiny model folder to damage (made before no_weights_read is armed)."""
    return shutil.copytree(model_dir, tmp_path / "model")


def test_folder_without_config_json(tmp_path, capsys, good_data, model_copy, no_weights_read):
    folder = model_copy
    (folder / "config.json").unlink()
    code, out, err, runs = train(capsys, tmp_path, folder, f"data.path={good_data}")
    assert_refused(code, out, err, [f"{folder}: not a model folder: no config.json (found: ",
                                    "model.safetensors"], runs)  # fmt: skip


def test_folder_without_weights(tmp_path, capsys, good_data, model_copy, no_weights_read):
    """Found while planning (the folder is listed, nothing read)."""
    folder = model_copy
    (folder / "model.safetensors").unlink()
    code, out, err, runs = train(capsys, tmp_path, folder, f"data.path={good_data}")
    assert_refused(code, out, err, [f"{folder}: no weights (model*.safetensors)"], runs)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, capsys, good_data, model_copy, damage):
    """Found only when the weights are read: the clean error only."""
    folder = model_copy
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(b"\x00\x01garbage" if damage == "garbage" else raw[: len(raw) // 2])
    code, out, err, runs = train(capsys, tmp_path, folder, f"data.path={good_data}")
    assert_refused(code, out, err, [f"{weights}: not a valid safetensors file: "], runs)


def test_corrupt_gguf(tmp_path, capsys, good_data):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, out, err, runs = train(capsys, tmp_path, gguf, f"data.path={good_data}")
    err = err.split("\n", 1)[-1] if err.startswith("tunelab: converting") else err
    assert_refused(code, out, err, [f"{gguf}: not a usable GGUF model ("], runs)
    converted = tmp_path / "home" / "gguf"
    assert not converted.exists() or not any(converted.iterdir())  # no half-converted folder
