"""Reading and validating records: every bad input names file, line and field."""

import pytest

from tunelab.data.read import read_rows
from tunelab.data.records import parse_examples
from tunelab.errors import DataError


def parse(path, **kw):
    return parse_examples(read_rows(path), **kw)


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        parse(path, **kw)
    return str(e.value)


# -- reading -----------------------------------------------------------------------------------
def test_malformed_jsonl_line_names_file_and_line(write):
    p = write("d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    msg = error_of(p)
    assert f"{p}:3: invalid JSON" in msg


def test_every_malformed_line_is_reported(write):
    p = write("d.jsonl", '{"text": "a"}\n{bad\n{"text": "c"}\n[1]\n')
    msg = error_of(p)
    assert f"{p}:2: invalid JSON" in msg and f"{p}:4: expected a JSON object" in msg


def test_empty_file(write):
    assert "empty" in error_of(write("d.jsonl", ""))
    assert "empty" in error_of(write("e.jsonl", "\n\n  \n"))


def test_bom_and_blank_lines_are_fine(write):
    p = write("d.jsonl", b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\n\n')
    examples = parse(p)
    assert [e.source.line for e in examples] == [1, 3]


def test_non_utf8_reports_byte_offset(write):
    p = write("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    msg = error_of(p)
    assert f"{p}:2: not valid UTF-8 at byte offset 28" in msg


def test_json_array_records_keep_their_line_numbers(write):
    p = write("d.json", '[\n  {"text": "a"},\n\n  {"text": "b",\n   "x": 1}\n]\n')
    assert [e.source.line for e in parse(p)] == [2, 4]


def test_json_array_syntax_error_names_line(write):
    p = write("d.json", '[\n  {"text": "a"},\n  {"text": }\n]')
    assert f"{p}:3: invalid JSON" in error_of(p)


def test_csv_rows_and_json_cells(write):
    p = write(
        "d.csv",
        'instruction,input,output\nAdd,"1, 2",3\n"Multi\nline",,ok\n',
    )
    examples = parse(p)
    assert [e.source.line for e in examples] == [2, 4]
    assert examples[0].messages[-2].content == "Add\n\n1, 2"
    p2 = write(
        "m.csv",
        'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n',
    )
    assert parse(p2)[0].format == "chat"


def test_missing_file():
    with pytest.raises(DataError, match="file not found"):
        read_rows("/nonexistent/data.jsonl")


# -- formats -----------------------------------------------------------------------------------
def test_formats_are_detected(write):
    p = write(
        "d.jsonl",
        "\n".join(
            [
                '{"instruction": "Add", "input": "1 2", "output": "3", "history": [["hi", "hello"]]}',
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                '{"prompt": "p", "chosen": "c", "rejected": "r"}',
                '{"question": "p", "positive_answer": "c", "negative_answer": "r"}',
                '{"instruction": "i", "output": "o", "kto_tag": "false"}',
                '{"text": "plain text"}',
            ]
        ),
    )
    ex = parse(p)
    assert [e.format for e in ex] == ["alpaca", "chat", "preference", "preference", "kto", "text"]
    assert [m.role for m in ex[0].messages] == ["user", "assistant", "user", "assistant"]
    assert ex[3].chosen == "c" and ex[3].rejected == "r" and ex[4].label is False


def test_chat_style_preference_uses_the_shared_prefix(write):
    p = write(
        "d.jsonl",
        '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],'
        ' "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}',
    )
    (ex,) = parse(p)
    assert [m.content for m in ex.messages] == ["q"] and (ex.chosen, ex.rejected) == ("good", "bad")


def test_system_prompt_from_config_and_record(write):
    p = write(
        "d.jsonl",
        '{"instruction": "i", "output": "o"}\n{"instruction": "i", "output": "o", "system": "own"}\n',
    )
    a, b = parse(p, system_prompt="cfg")
    assert a.messages[0].content == "cfg" and b.messages[0].content == "own"


def test_columns_remap(write):
    p = write("d.jsonl", '{"q": "What?", "a": "That."}\n')
    (ex,) = parse(p, columns={"instruction": "q", "output": "a"})
    assert ex.format == "alpaca" and ex.messages[-1].content == "That."


# -- bad records -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"instruction": "i", "ouput": "o"}', "output: missing (fields found: instruction, ouput); did you mean 'ouput'?"),
        ('{"prompt_text": "p", "answer": "a"}', "cannot tell the record format from the fields found [answer, prompt_text]"),
        ('{"instruction": 5, "output": "o"}', "instruction: expected a string, got int"),
        ('{"instruction": "  ", "output": "o"}', "instruction: is empty"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role: 'bot' is not a role (expected one of: system, user, assistant)"),
        ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content: is empty"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "ends with a user message"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}', "messages[1].weight: expected 0 or 1"),
        ('{"messages": "hello"}', "messages: expected a list of messages, got a string"),
        ('{"prompt": "p", "chosen": "c"}', "rejected: missing"),
        ('{"instruction": "i", "output": "o", "kto_tag": "maybe"}', "kto_tag: expected true or false, got 'maybe'"),
        ('{"instruction": "i", "output": "o", "history": [["only one"]]}', "history[0]: expected a [user, assistant] pair"),
    ],
)  # fmt: skip
def test_bad_record_messages(write, line, expected):
    p = write("d.jsonl", '{"text": "fine"}\n' + line + "\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:2: ")
    assert expected in msg


def test_every_bad_record_is_listed_and_capped(write):
    p = write("d.jsonl", "\n".join('{"instruction": "i"}' for _ in range(30)))
    with pytest.raises(DataError) as e:
        parse(p)
    assert e.value.total == 30
    assert f"{p}:20: output: missing" in str(e.value) and "... and 10 more problem(s)" in str(
        e.value
    )


def test_forced_format_validates_against_it(write):
    p = write("d.jsonl", '{"text": "x"}\n')
    assert "instruction: missing" in error_of(p, format="alpaca")


def test_a_pair_whose_chosen_equals_rejected_is_refused(write):
    p = write("pairs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                             '{"prompt": "q", "chosen": "Same answer.", "rejected": " Same answer. "}\n')  # fmt: skip
    assert f"{p}:2: rejected: is the same answer as chosen" in error_of(p)
