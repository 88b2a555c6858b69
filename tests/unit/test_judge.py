"""LLM-as-judge against a real local HTTP server speaking the OpenAI chat-completions format."""

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.fakes.openai_server import CHAT_PATH, FakeOpenAI, Reply, closed_port_url, serve
from tunelab.errors import ConfigError
from tunelab.evaluate.judge import (
    DEFAULT_RUBRIC,
    HTTPJudge,
    JudgeResult,
    LocalJudge,
    fill_rubric,
    judge_all,
    parse_score,
    summarize_judge,
)

FAST = dict(timeout=2, backoff=0.01)


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# --- parse_score -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 7", 7.0),
        ("The answer is right.\nscore: 7/10", 7.0),
        ("**Score:** 8", 8.0),
        ("**Score**: 9", 9.0),
        ("SCORE = 6", 6.0),
        ("Final score: 5 out of 10", 5.0),
        ("Score: [[4]]", 4.0),
        ("Score: 7.5", 7.5),
        ("7", 7.0),
        (" 10 \n", 10.0),
        ("**8**", 8.0),
        ("3/10", 3.0),
        ("I will end with 'Score: N'. Score: 2 ... on reflection, Score: 6", 6.0),
        ("Score: 1", 1.0),
    ],
)
def test_parse_score_reads_the_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Great answer, well done.",
        "Score: 0",
        "Score: 11",
        "Score: -3",
        "Score: 8/100",
        "Score: 4/5",
        "Score: 9\n(correction) Score: 12",  # the last one wins, and it is out of range
        "The answer mentions 7 points.",  # a number in prose is not a score
        "Score: N",
    ],
)
def test_parse_score_rejects_what_is_not_a_1_to_10_score(text):
    assert parse_score(text) is None


def test_rubric_is_filled_once_and_literally():
    assert all(p in DEFAULT_RUBRIC for p in ("{prompt}", "{reference}", "{answer}"))
    assert DEFAULT_RUBRIC.rstrip().splitlines()[-2] == "Score: N"
    text = fill_rubric("P={prompt} R={reference} A={answer} {other}", "{answer}", None, "x {}")
    assert text == "P={answer} R=(no reference given) A=x {} {other}"


# --- the fake server itself ---------------------------------------------------------------------


def _post(url, body: bytes):
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_fake_server_speaks_the_chat_completions_format_and_survives_bad_requests():
    fake = FakeOpenAI(lambda body: f"echo {body['messages'][-1]['content']}")
    with serve(fake) as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        good = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})

        status, reply = _post(base_url + "/chat/completions", good.encode())
        assert status == 200
        assert reply["object"] == "chat.completion" and reply["model"] == "m"
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo hi"}
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert set(reply["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}

        status, reply = _post(base_url + "/chat/completions", b"{not json")
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
        status, reply = _post(base_url + "/chat/completions", b'{"messages": []}')
        assert status == 400 and "model" in reply["error"]["message"]
        status, reply = _post(base_url + "/nowhere", good.encode())
        assert status == 404 and "/nowhere" in reply["error"]["message"]

        status, reply = _post(base_url + "/chat/completions", good.encode())  # still serving
        assert status == 200
    assert [r.path for r in fake.requests] == [CHAT_PATH] * 3 + ["/v1/nowhere", CHAT_PATH]


def test_fake_server_stops_by_itself():
    with serve("Score: 5", lifetime=0.2) as base_url:
        time.sleep(0.6)
        with pytest.raises(urllib.error.URLError):
            _post(base_url + "/chat/completions", b"{}")


# --- HTTPJudge -----------------------------------------------------------------------------------


def test_a_good_reply_is_scored_and_the_request_is_openai_shaped():
    fake = FakeOpenAI("The answer matches the reference.\nScore: 8")
    with serve(fake) as base_url:
        result = HTTPJudge(base_url + "/", "judge-model", **FAST).score("2+2?", "4", "four")
    assert result == JudgeResult(8.0, None, "The answer matches the reference.\nScore: 8")
    (request,) = fake.requests
    assert request.path == CHAT_PATH
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers  # default key variable unset: no key
    body = request.json
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 256
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert message["content"] == fill_rubric(DEFAULT_RUBRIC, "2+2?", "4", "four")


def test_the_key_is_sent_from_the_environment_variable(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    fake = FakeOpenAI("Score: 6")
    with serve(fake) as base_url:
        assert HTTPJudge(base_url, "m", api_key_env="JUDGE_KEY", **FAST).score("p", "r", "a").score
        assert HTTPJudge(base_url, "m", **FAST).score("p", "r", "a").score == 6
        assert HTTPJudge(base_url, "m", api_key_env=None, **FAST).score("p", "r", "a").score
    auth = [r.headers.get("authorization") for r in fake.requests]
    assert auth == ["Bearer sk-test-123", "Bearer sk-default", None]


def test_a_named_key_variable_that_is_not_set_is_a_config_error_before_any_request():
    fake = FakeOpenAI()
    with serve(fake) as base_url, pytest.raises(ConfigError, match="TUNELAB_NO_SUCH_KEY"):
        HTTPJudge(base_url, "m", api_key_env="TUNELAB_NO_SUCH_KEY")
    assert fake.requests == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_url="127.0.0.1:8000/v1"), "base_url"),
        (dict(model=""), "model"),
        (dict(timeout=0), "timeout"),
        (dict(max_retries=-1), "max_retries"),
        (dict(rubric="Grade {prompt}"), "answer"),
    ],
)
def test_impossible_settings_are_config_errors(kwargs, match):
    args = dict(base_url="http://127.0.0.1:1/v1", model="m") | kwargs
    with pytest.raises(ConfigError, match=match):
        HTTPJudge(args.pop("base_url"), args.pop("model"), **args)


def test_a_500_is_retried_then_reported_never_scored():
    fake = FakeOpenAI(always=Reply(500, {"error": {"message": "the GPU caught fire"}}))
    with serve(fake) as base_url:
        result = HTTPJudge(base_url, "m", max_retries=2, **FAST).score("p", "r", "a")
    assert result.score is None and result.raw is None
    assert result.error.startswith(f"HTTP 500 from {base_url}/chat/completions: ")
    assert "the GPU caught fire" in result.error and "after 3 attempts" in result.error
    assert len(fake.requests) == 3


def test_a_429_then_ok_succeeds_after_a_retry_and_honours_retry_after():
    fake = FakeOpenAI("Score: 9", responses=[Reply(429, {"error": {}}, {"Retry-After": "0.2"})])
    with serve(fake) as base_url:
        start = time.monotonic()
        result = HTTPJudge(base_url, "m", **FAST).score("p", "r", "a")
        waited = time.monotonic() - start
    assert result == JudgeResult(9.0, None, "Score: 9")
    assert len(fake.requests) == 2
    assert waited >= 0.2


@pytest.mark.parametrize("status", [400, 401, 404])
def test_other_4xx_fail_at_once(status):
    fake = FakeOpenAI(always=status)
    with serve(fake) as base_url:
        result = HTTPJudge(base_url, "m", max_retries=3, **FAST).score("p", "r", "a")
    assert result.score is None and result.error.startswith(f"HTTP {status} from ")
    assert f"forced {status}" in result.error
    assert len(fake.requests) == 1


def test_a_closed_port_reports_connection_refused():
    url = closed_port_url()
    result = HTTPJudge(url, "m", max_retries=1, **FAST).score("p", "r", "a")
    assert result.score is None
    assert "connection refused" in result.error and url in result.error
    assert "after 2 attempts" in result.error


def test_a_reply_without_a_score_reports_no_score():
    with serve("A fine answer, I would say.") as base_url:
        result = HTTPJudge(base_url, "m", **FAST).score("p", "r", "a")
    assert result.score is None
    assert result.error == "no score in the judge's reply: 'A fine answer, I would say.'"
    assert result.raw == "A fine answer, I would say."


@pytest.mark.parametrize(
    "reply, match",
    [
        (Reply(200, b"<html>gateway</html>"), "not JSON"),
        (Reply(200, {"choices": []}), "no choices"),
        (Reply(200, {"choices": [{"message": {"content": None}}]}), "not text"),
    ],
)
def test_a_malformed_reply_is_reported(reply, match):
    fake = FakeOpenAI(always=reply)
    with serve(fake) as base_url:
        result = HTTPJudge(base_url, "m", **FAST).score("p", "r", "a")
    assert result.score is None and result.error.startswith("malformed reply from ")
    assert match in result.error
    assert len(fake.requests) == 1


def test_a_slow_judge_times_out_and_is_reported():
    with serve(FakeOpenAI(delay=1.0)) as base_url:
        result = HTTPJudge(base_url, "m", timeout=0.2, max_retries=0).score("p", "r", "a")
    assert result.score is None and "within 0.2 s" in result.error


# --- judge_all, summarize_judge, score_many ------------------------------------------------------


def _grader(body):
    """Scores the answer's length; answers containing 'fail' get a reply without a score."""
    answer = body["messages"][0]["content"].split("[Assistant's answer]\n")[1].split("\n")[0]
    return "No idea." if "fail" in answer else f"Score: {len(answer)}"


def test_judge_all_collects_failures_and_summarize_ignores_them():
    answers = ["abc", "fail", "abcde", "x" * 20, "ab"]
    items = [(f"q{i}", "ref", a) for i, a in enumerate(answers)]
    fake = FakeOpenAI(_grader, responses=[Reply(200, {"choices": []})])  # the first malformed
    with serve(fake) as base_url:
        scores, failures = judge_all(HTTPJudge(base_url, "m", workers=1, **FAST), items)
    assert scores == [None, None, 5.0, None, 2.0]
    assert [f.split(":")[0] for f in failures] == ["example 0", "example 1", "example 3"]
    assert "malformed" in failures[0] and "no score" in failures[1]
    assert "no score" in failures[2] and "Score: 20" in failures[2]
    assert summarize_judge(scores) == {"mean": 3.5, "scored": 2, "failed": 3}
    assert summarize_judge([None, None]) == {"mean": None, "scored": 0, "failed": 2}
    assert summarize_judge([]) == {"mean": None, "scored": 0, "failed": 0}


def test_score_many_keeps_the_order_with_parallel_requests():
    items = [(f"q{i}", "r", "y" * (i + 1)) for i in range(10)]
    with serve(FakeOpenAI(_grader, delay=0.05)) as base_url:
        results = HTTPJudge(base_url, "m", workers=4, **FAST).score_many(items)
    assert [r.score for r in results] == [float(i + 1) for i in range(10)]


def test_a_dead_endpoint_is_given_up_on_and_every_example_is_reported():
    fake = FakeOpenAI(always=503)
    items = [("p", "r", "a")] * 6
    with serve(fake) as base_url:
        judge = HTTPJudge(base_url, "m", max_retries=0, workers=1, give_up_after=2, **FAST)
        scores, failures = judge_all(judge, items)
    assert scores == [None] * 6 and len(failures) == 6
    assert len(fake.requests) == 2
    assert failures[0].startswith("example 0: HTTP 503")
    assert failures[5].startswith("example 5: not sent: ") and "2 requests in a row" in failures[5]


# --- LocalJudge ----------------------------------------------------------------------------------


def test_local_judge_batches_and_reports_failures_per_batch():
    calls = []

    def generate(conversations):
        calls.append(len(conversations))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        replies = []
        for conversation in conversations:
            (message,) = conversation
            assert message["role"] == "user" and "[Reference answer]" in message["content"]
            answer = message["content"].split("[Assistant's answer]\n")[1].split("\n")[0]
            replies.append("hmm" if answer == "?" else f"**Score:** {answer}")
        return replies

    items = [("p", "r", a) for a in ["3", "?", "9", "4", "5"]]
    judge = LocalJudge(generate, batch_size=2)
    scores, failures = judge_all(judge, items)
    assert calls == [2, 2, 1]
    assert scores == [3.0, None, None, None, 5.0]
    assert failures[0].startswith("example 1: no score in the judge's reply: 'hmm'")
    assert failures[1:] == [
        "example 2: the local judge failed: RuntimeError: CUDA out of memory",
        "example 3: the local judge failed: RuntimeError: CUDA out of memory",
    ]
    assert judge.score("p", None, "7") == JudgeResult(7.0, None, "**Score:** 7")


def test_local_judge_reports_a_wrong_number_of_replies():
    judge = LocalJudge(lambda conversations: ["Score: 5"])
    results = judge.score_many([("p", "r", "a"), ("p", "r", "b")])
    assert [r.score for r in results] == [None, None]
    assert results[0].error == "the local judge gave 1 replies to 2 prompts"
