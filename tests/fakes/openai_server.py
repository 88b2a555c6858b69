"""A fake OpenAI-compatible chat-completions server for tests: real HTTP, loopback only.

    fake = FakeOpenAI(lambda request: "Score: 7", responses=[429])  # one 429, then replies
    with serve(fake) as base_url:  # "http://127.0.0.1:<ephemeral port>/v1"
        ...
    fake.requests[0].headers["authorization"], fake.requests[0].json["messages"]

It speaks the wire format the ``openai`` client does: ``POST /v1/chat/completions`` with a
JSON body holding ``model`` and ``messages``, answered with a ``chat.completion`` object;
errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status. A wrong
path is a 404, a body that is not JSON (or lacks ``model``/``messages``) a 400, and the server
keeps serving. It listens on 127.0.0.1 only and shuts itself down after ``lifetime`` seconds
if the ``with`` block has not ended by then.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass
class Reply:
    """A forced response: any status, and a body (a dict is sent as JSON, bytes as they are)."""

    status: int = 200
    body: dict | str | bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def error_reply(status: int, message: str, kind: str | None = None) -> Reply:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    kinds |= {429: "rate_limit_error"}
    kind = kind or kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return Reply(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


class FakeOpenAI:
    """What the fake server answers, and what it was asked.

    ``content``: the assistant's reply, a string or a function of the request's JSON body.
    ``responses``: forced replies used first, one per request (a status code such as 500, 401
    or 429 gives an OpenAI-style JSON error; a :class:`Reply` is sent as it is), then normal
    replies. ``always``: a forced reply for every request after those. ``delay``: seconds to
    wait before answering. ``requests``: every request received, in order."""

    def __init__(
        self,
        content: str | Callable[[dict], str] = "Score: 7",
        *,
        responses: Iterable[int | Reply] = (),
        always: int | Reply | None = None,
        delay: float = 0.0,
    ):
        self.content = content
        self.responses = deque(responses)
        self.always = always
        self.delay = delay
        self.requests: list[Request] = []
        self.base_url: str | None = None
        self._lock = threading.Lock()

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == CHAT_PATH]

    def respond(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if request.method != "POST" or request.path != CHAT_PATH:
                return error_reply(404, f"Unknown request URL: {request.method} {request.path}")
            forced = self.responses.popleft() if self.responses else self.always
        if forced is not None:
            return forced if isinstance(forced, Reply) else error_reply(forced, f"forced {forced}")
        try:
            body = request.json
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error_reply(400, f"We could not parse the JSON body of your request: {e}")
        if not isinstance(body, dict) or "model" not in body:
            return error_reply(400, "you must provide a model parameter")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return error_reply(400, "'messages' must be a non-empty array")
        text = self.content(body) if callable(self.content) else self.content
        return Reply(200, completion(body["model"], body["messages"], text))


def completion(model: str, messages: list, text: str) -> dict:
    """A ``chat.completion`` object as the OpenAI API returns it."""
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion_tokens = len(text.split())
    return {
        "id": f"chatcmpl-fake{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # an idle or stuck connection frees its thread after this

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        fake = self.server.fake
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: no more requests here
            self._send(error_reply(400, "a valid Content-Length header is required"))
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = fake.respond(Request(self.command, self.path.split("?")[0], headers, body))
        if fake.delay:
            time.sleep(fake.delay)
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        body = reply.body
        if isinstance(body, dict):
            data = json.dumps(body).encode("utf-8")
            content_type = "application/json"
        else:
            data = body.encode("utf-8") if isinstance(body, str) else body
            content_type = "text/plain; charset=utf-8"
        try:
            self.send_response(reply.status)
            headers = {"Content-Type": content_type, **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


@contextmanager
def serve(
    fake: FakeOpenAI | str | Callable[[dict], str] | None = None, *, lifetime: float = 30.0
) -> Iterator[str]:
    """Run ``fake`` on 127.0.0.1 (an ephemeral port) for the ``with`` block; yields its
    ``base_url``, ending in ``/v1``. A string or function is wrapped in a :class:`FakeOpenAI`.
    The server stops when the block ends, or by itself after ``lifetime`` seconds."""
    if not isinstance(fake, FakeOpenAI):
        fake = FakeOpenAI() if fake is None else FakeOpenAI(fake)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()

    def stop() -> None:
        server.shutdown()  # waits for serve_forever to return
        server.server_close()  # then nothing listens: new connections are refused

    timer = threading.Timer(lifetime, stop)
    timer.daemon = True
    timer.start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake.base_url
    finally:
        timer.cancel()
        if thread.is_alive():
            stop()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback ``base_url`` nothing listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
