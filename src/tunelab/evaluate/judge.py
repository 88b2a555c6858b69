"""LLM-as-judge: a rubric prompt, scored 1-10 by a judge model.

The judge is either any OpenAI-compatible endpoint (:class:`HTTPJudge`: ``base_url``, ``model``,
the key read from an environment variable) or a local model tunelab loaded
(:class:`LocalJudge`, given a batch generation callback). Both fill the same rubric and read the
score with :func:`parse_score`.

A judge that fails (the endpoint is down, answers 500, replies without a score) gives a
:class:`JudgeResult` with ``score=None`` and the reason in ``error``. :func:`judge_all` returns
those reasons next to the scores, and :func:`summarize_judge` counts them apart: a failure is
never turned into a number.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from tunelab.errors import ConfigError

DEFAULT_RUBRIC = """\
You are an impartial judge. Grade an AI assistant's answer to a user's request.

Compare the answer with the reference answer, which is known to be good, and judge:
- Correctness: are the facts, reasoning, code or final result right and consistent with the \
reference? An answer that contradicts the reference on a point that matters is wrong, however \
well it is written.
- Helpfulness: does it do what the user asked, completely and clearly, without padding? It need \
not match the reference word for word: a different answer that is also correct is fine.

Scale:
1-2: wrong, off-topic, empty, or refuses without reason.
3-4: mostly wrong or misses the main point; only small parts are right.
5-6: partly right, with important errors or omissions.
7-8: right and helpful, with minor errors, omissions or unclear parts.
9-10: fully right, complete and clear; as good as the reference or better.

[User request]
{prompt}

[Reference answer]
{reference}

[Assistant's answer]
{answer}

Explain your judgement in at most three sentences. Then, on the last line, write the score \
in the form
Score: N
where N is a whole number from 1 to 10.
"""


class _DefaultKeyEnv(str):
    """The default key variable: optional, unlike a variable named explicitly."""


#: The environment variable an :class:`HTTPJudge` reads its key from unless told otherwise.
#: Pass this object (not the plain string) to keep the default's "optional" meaning.
DEFAULT_KEY_ENV = _DefaultKeyEnv("OPENAI_API_KEY")

_PLACEHOLDER = re.compile(r"\{(prompt|reference|answer)\}")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
# "Score: 7", "score: 7/10", "**Score:** 8", "Score = [[8]]", "Final score: 9 out of 10"
_SCORE = re.compile(r"\bscore\s*\**\s*[:=]\s*\**\s*[\[(]*\s*" + _NUMBER + _OUT_OF, re.IGNORECASE)
# a reply that is only a number: "7", "7/10", "**8**", "8."
_BARE = re.compile(r"\s*\**\s*" + _NUMBER + _OUT_OF + r"\s*\**\s*\.?\s*")
_SNIPPET = 200


@dataclass(frozen=True)
class JudgeResult:
    """One judgement: a score in [1, 10], or ``score=None`` and the reason in ``error``.

    ``raw`` is the judge's reply text when one came back (also when it held no score)."""

    score: float | None
    error: str | None
    raw: str | None = None


class Judge(Protocol):
    def score_many(self, items: Sequence[tuple[str, str | None, str]]) -> list[JudgeResult]: ...


def parse_score(text: str | None) -> float | None:
    """The 1-10 score in a judge's reply, or None.

    Reads ``Score: N`` (any case, markdown bold, ``N/10``); where there are several, the last
    one wins (judges restate the format before answering). A reply that is only a number is
    read as that number. A score outside 1-10, or out of anything but 10, is None."""
    if not text:
        return None
    matches = list(_SCORE.finditer(text))
    match = matches[-1] if matches else _BARE.fullmatch(text)
    if match is None:
        return None
    value = float(match.group(1))
    if match.group(2) is not None and float(match.group(2)) != 10:
        return None
    return value if 1 <= value <= 10 else None


def fill_rubric(rubric: str, prompt: str, reference: str | None, answer: str) -> str:
    """The rubric with ``{prompt}``, ``{reference}`` and ``{answer}`` filled in.

    One pass, literal: other braces in the rubric and braces in the texts are left alone."""
    values = {
        "prompt": prompt,
        "reference": reference if reference is not None else "(no reference given)",
        "answer": answer,
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], rubric)


def _check_rubric(rubric: str) -> None:
    if "{answer}" not in rubric:
        raise ConfigError(
            "judge.rubric: the rubric has no {answer} placeholder, so the judge would never see "
            "the answer it grades (placeholders: {prompt}, {reference}, {answer})"
        )


def _snippet(text: str | bytes, limit: int = _SNIPPET) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _no_score(reply: str) -> JudgeResult:
    return JudgeResult(None, f"no score in the judge's reply: {_snippet(reply)!r}", reply)


def _parsed(reply: str) -> JudgeResult:
    value = parse_score(reply)
    return JudgeResult(value, None, reply) if value is not None else _no_score(reply)


class _Malformed(Exception):
    pass


class HTTPJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1`` or
    ``https://api.openai.com/v1``; requests go to ``{base_url}/chat/completions``.

    The key is read from the environment variable ``api_key_env`` when the judge is made and
    sent as ``Authorization: Bearer``. Left at its default (``OPENAI_API_KEY``), a variable that
    is not set means no key (a local server); a variable named explicitly must be set
    (:class:`ConfigError` otherwise, before any request); ``None`` never sends a key.

    Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times, waiting
    ``backoff`` seconds and doubling (or the server's ``Retry-After``, up to 60 s); other 4xx
    fail at once. ``score_many`` sends ``workers`` requests at a time and, after
    ``give_up_after`` requests in a row got no reply at all, reports the rest as not sent
    instead of waiting on a dead endpoint for each of them."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = DEFAULT_KEY_ENV,
        timeout: float = 60,
        rubric: str = DEFAULT_RUBRIC,
        max_retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 256,
        backoff: float = 1.0,
        workers: int = 4,
        give_up_after: int | None = 8,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"judge.base_url: {base_url!r} is not an http(s) URL "
                "(expected e.g. http://127.0.0.1:8000/v1)"
            )
        if not model:
            raise ConfigError("judge.model: empty; name the model the endpoint should run")
        for name, value, low in (
            ("timeout", timeout, 0),
            ("max_retries", max_retries, 0),
            ("backoff", backoff, 0),
            ("workers", workers, 1),
            ("max_tokens", max_tokens, 1),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ConfigError(f"judge.{name}: {value!r} (must be a number >= {low})")
        if timeout == 0:
            raise ConfigError("judge.timeout: 0 (must be > 0 seconds)")
        _check_rubric(rubric)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = float(timeout)
        self.rubric = rubric
        self.max_retries = int(max_retries)
        self.temperature = temperature
        self.max_tokens = int(max_tokens)
        self.backoff = float(backoff)
        self.workers = int(workers)
        self.give_up_after = give_up_after
        self._key = self._read_key(api_key_env)
        host = parts.hostname or ""
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        # a judge on this machine is reached directly, whatever proxy the environment names
        handlers = [urllib.request.ProxyHandler({})] if loopback else []
        self._opener = urllib.request.build_opener(*handlers)

    @staticmethod
    def _read_key(api_key_env: str | None) -> str | None:
        if api_key_env is None:
            return None
        key = os.environ.get(api_key_env, "").strip()
        if key:
            return key
        if isinstance(api_key_env, _DefaultKeyEnv):  # not a choice: maybe a keyless local server
            return None
        raise ConfigError(
            f"judge.api_key_env: the environment variable {api_key_env} is not set "
            f"(export {api_key_env}=..., or set judge.api_key_env to null for a server "
            "that needs no key)"
        )

    def score(self, prompt: str, reference: str | None, answer: str) -> JudgeResult:
        return self._score(prompt, reference, answer)[0]

    def score_many(self, items: Sequence[tuple[str, str | None, str]]) -> list[JudgeResult]:
        results: list[JudgeResult] = []
        no_reply_in_a_row = 0
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(items), self.workers):
                wave = items[start : start + self.workers]
                for result, no_reply in pool.map(lambda item: self._score(*item), wave):
                    results.append(result)
                    no_reply_in_a_row = no_reply_in_a_row + 1 if no_reply else 0
                if self.give_up_after and no_reply_in_a_row >= self.give_up_after:
                    error = (
                        f"not sent: the judge at {self.url} gave no reply to "
                        f"{no_reply_in_a_row} requests in a row (last: {results[-1].error})"
                    )
                    results += [JudgeResult(None, error, None)] * (len(items) - len(results))
                    break
        return results

    def _score(self, prompt: str, reference: str | None, answer: str) -> tuple[JudgeResult, bool]:
        """The result, and whether the endpoint gave no reply at all."""
        body = {
            "model": self.model,
            "messages": [
                {"role": "user", "content": fill_rubric(self.rubric, prompt, reference, answer)}
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        reply, error = self._post(json.dumps(body).encode("utf-8"))
        if reply is None:
            return JudgeResult(None, error, None), True
        return _parsed(reply), False

    def _post(self, body: bytes) -> tuple[str | None, str | None]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "tunelab-judge",
        }
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        attempts = self.max_retries + 1
        error = ""
        for attempt in range(attempts):
            retry_after: str | None = None
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    payload = response.read()
                return self._content(payload), None
            except _Malformed as e:
                return None, f"malformed reply from {self.url}: {e}"
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} from {self.url}: {_snippet(_read(e))}"
                if e.code != 429 and e.code < 500:
                    return None, error
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except urllib.error.URLError as e:
                error = self._transport_error(e.reason)
            except (OSError, http.client.HTTPException) as e:
                error = self._transport_error(e)
            if attempt + 1 < attempts:
                time.sleep(self._delay(attempt, retry_after))
        return None, f"{error} (after {attempts} attempts)" if attempts > 1 else error

    def _transport_error(self, reason: object) -> str:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no reply from {self.url} within {self.timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused by {self.url} (is the judge server running?)"
        return f"cannot reach {self.url}: {reason}"

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * 2**attempt
        try:
            if retry_after is not None:
                delay = max(delay, min(float(retry_after), 60.0))
        except ValueError:  # an HTTP date: keep our own backoff
            pass
        return delay

    @staticmethod
    def _content(payload: bytes) -> str:
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Malformed(f"not JSON: {_snippet(payload)!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Malformed(f"no choices[0].message.content in {_snippet(payload)!r}") from None
        if not isinstance(content, str):
            raise _Malformed(f"choices[0].message.content is {content!r}, not text")
        return content


def _read(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


class LocalJudge:
    """A judge run by a model tunelab loaded.

    ``generate`` maps a batch of conversations (each a list of ``{"role", "content"}``) to one
    reply text each, e.g. ``lambda convs: generate(model, tokenizer, convs, options)`` with
    :func:`tunelab.evaluate.generate.generate` and greedy options. It is called with at most
    ``batch_size`` conversations at a time; a batch whose call fails is reported as failed,
    item by item, and the other batches are still scored."""

    def __init__(
        self,
        generate: Callable[[list[list[dict]]], list[str]],
        *,
        rubric: str = DEFAULT_RUBRIC,
        batch_size: int = 8,
    ):
        if batch_size < 1:
            raise ConfigError(f"judge.batch_size: {batch_size!r} (must be >= 1)")
        _check_rubric(rubric)
        self.generate = generate
        self.rubric = rubric
        self.batch_size = batch_size

    def score(self, prompt: str, reference: str | None, answer: str) -> JudgeResult:
        return self.score_many([(prompt, reference, answer)])[0]

    def score_many(self, items: Sequence[tuple[str, str | None, str]]) -> list[JudgeResult]:
        results: list[JudgeResult] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            conversations = [
                [{"role": "user", "content": fill_rubric(self.rubric, p, r, a)}]
                for p, r, a in batch
            ]
            try:
                replies = list(self.generate(conversations))
            except Exception as e:  # reported per item, never scored; other batches go on
                error = f"the local judge failed: {type(e).__name__}: {e}"
                results += [JudgeResult(None, error, None)] * len(batch)
                continue
            if len(replies) != len(batch):
                error = f"the local judge gave {len(replies)} replies to {len(batch)} prompts"
                results += [JudgeResult(None, error, None)] * len(batch)
                continue
            results += [_parsed(r) if isinstance(r, str) else _no_score(repr(r)) for r in replies]
        return results


def judge_all(
    judge: Judge, items: Sequence[tuple[str, str | None, str]]
) -> tuple[list[float | None], list[str]]:
    """Score every ``(prompt, reference, answer)``.

    Returns the scores (None where the judge failed) and one message per failure,
    ``"example 3: HTTP 500 from ..."``, numbered from 0 like the scores."""
    items = [tuple(item) for item in items]
    for i, item in enumerate(items):
        if len(item) != 3:
            raise ValueError(f"example {i}: expected (prompt, reference, answer), got {item!r}")
    results = judge.score_many(items) if items else []
    if len(results) != len(items):
        raise RuntimeError(f"the judge returned {len(results)} results for {len(items)} items")
    scores = [r.score for r in results]
    failures = [
        f"example {i}: {r.error or 'no score'}" for i, r in enumerate(results) if r.score is None
    ]
    return scores, failures


def summarize_judge(scores: Sequence[float | None]) -> dict:
    """``{"mean", "scored", "failed"}``: the mean is over scored examples only (None when
    there are none); failures are counted, never averaged in."""
    scored = [s for s in scores if s is not None]
    return {
        "mean": sum(scored) / len(scored) if scored else None,
        "scored": len(scored),
        "failed": len(scores) - len(scored),
    }
