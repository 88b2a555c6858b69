"""The OpenAI-compatible HTTP API over an :class:`~tunelab.serve.engine.Engine` (FastAPI):
``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (streamed as server-sent events
or not), ``/v1/adapters`` (add / remove at run time), ``/health``. Every error is a 4xx JSON
body in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and the server
keeps serving."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.serve.engine import Busy, Engine, Job, RequestError


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields (n=1, user...) are accepted

    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1)
    path: str


def error(status: int, message: str, *, kind: str = "invalid_request_error", param=None, code=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(
    engine: Engine, *, api_key: str | None = None, default_max_tokens: int = 256
) -> FastAPI:
    app = FastAPI(title="tunelab serve")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given, api_key):
                return error(401, "Incorrect API key provided", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(
            400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None
        )

    @app.exception_handler(RequestError)
    async def refused(_request, exc: RequestError):
        return error(
            404 if exc.code == "model_not_found" else 400, str(exc), param=exc.param, code=exc.code
        )

    @app.exception_handler(Busy)
    async def busy(_request, exc: Busy):
        return error(429, str(exc), kind="rate_limit_error", code="server_busy")

    @app.exception_handler(Exception)
    async def failed(_request, exc: Exception):
        return error(
            500,
            f"the server failed on this request: {type(exc).__name__}: {exc}",
            kind="server_error",
        )

    @app.get("/health")
    def health():
        return {"status": "ok", "models": engine.models, "waiting": engine.jobs.qsize()}

    @app.get("/v1/models")
    def models():
        data = [
            {"id": m, "object": "model", "created": engine.created, "owned_by": "tunelab"}
            for m in engine.models
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest):
        ids = engine.prompt_ids(messages=[m.model_dump() for m in body.messages])
        return _answer(engine, body, ids, chat=True, default_max_tokens=default_max_tokens)

    @app.post("/v1/completions")
    def complete(body: CompletionRequest):
        return _answer(engine, body, engine.prompt_ids(prompt=body.prompt), chat=False,
                       default_max_tokens=default_max_tokens)  # fmt: skip

    @app.post("/v1/adapters")
    def add(body: AdapterRequest):
        engine.add_adapter(body.name, Path(body.path))
        return {"id": body.name, "object": "model", "models": engine.models}

    @app.delete("/v1/adapters/{name}")
    def remove(name: str):
        engine.remove_adapter(name)
        return {"id": name, "deleted": True, "models": engine.models}

    return app


def _answer(engine: Engine, body: Sampling, ids: list[int], *, chat: bool, default_max_tokens: int):
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    job = engine.submit(Job(model=body.model, prompt_ids=ids, max_tokens=max_tokens,
                            temperature=body.temperature, top_p=body.top_p, seed=body.seed))  # fmt: skip
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if body.stream:
        return StreamingResponse(
            _events(job, rid, created, body.model, chat), media_type="text/event-stream"
        )
    text = "".join(job.pieces())
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
              else {"index": 0, "text": text})  # fmt: skip
    choice["finish_reason"] = job.finish_reason
    usage = {"prompt_tokens": len(ids), "completion_tokens": job.completion_tokens,
             "total_tokens": len(ids) + job.completion_tokens}  # fmt: skip
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": body.model,
        "choices": [choice],
        "usage": usage,
    }


def _events(job: Job, rid: str, created: int, model: str, chat: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: dict | str, finish: str | None) -> str:
        choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta}
        choice["finish_reason"] = finish
        return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model, 'choices': [choice]})}\n\n"

    if chat:
        yield event({"role": "assistant", "content": ""}, None)
    try:
        for piece in job.pieces():
            yield event({"content": piece} if chat else piece, None)
    except Exception as e:  # noqa: BLE001 - the stream has begun: say it in the stream
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        return
    yield event({} if chat else "", job.finish_reason)
    yield "data: [DONE]\n\n"
