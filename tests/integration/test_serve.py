"""`tunelab serve` on loopback, through the official `openai` client: models, a chat completion
per adapter equal to that adapter alone, streaming, completions, bad requests in OpenAI's error
shape (the server keeps serving), interleaved concurrent requests for two adapters with no
leak, a full queue answered 429, adapters added and removed at run time, the API key."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from tests.integration.runs import config, quiet
from tunelab.evaluate.generate import GenerationOptions, generate
from tunelab.models.load import load_model
from tunelab.serve.app import create_app
from tunelab.serve.engine import Engine, Job
from tunelab.workflow.finetune import finetune

KEY = "sk-test-key"
ASK = [{"role": "user", "content": "Extract the number from: order 5 of 35 boxes"}]
TOKENS = 12


def _run(root, model_dir, answer: str, name: str):
    data = root / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Extract the number from: order {i} of {i * 7} boxes",
                                          "output": answer}) for i in range(16)))  # fmt: skip
    return finetune(config(root, model_dir, data, f"name={name}", "train.lr=2e-2", "train.max_steps=30",
                           "method.r=16", "train.eval_steps=30", "train.save_steps=30"), log=quiet)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("serve")
    return {
        "a": _run(root, model_dir, "alpha alpha alpha", "a"),
        "b": _run(root, model_dir, "beta 7 beta", "b"),
    }


@pytest.fixture(scope="module")
def server(runs, model_dir):
    engine = Engine(str(model_dir), device="cpu", max_queue=4)
    for name, run in runs.items():
        engine.add_adapter(name, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, api_key=KEY, default_max_tokens=TOKENS)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def alone(runs, model_dir):
    """What each model answers on its own: the base, and each run (its adapter merged)."""
    out = {}
    for name, target in [(str(model_dir), str(model_dir)), *[(k, str(v)) for k, v in runs.items()]]:
        model, tokenizer = load_model(target)
        out[name] = generate(model, tokenizer, [ASK], GenerationOptions(max_new_tokens=TOKENS))[0]
    return out


def _chat(client, model, **kw):
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=TOKENS, temperature=0, **kw
    )
    return r.choices[0].message.content


def test_models_and_health(client, server, model_dir):
    assert [m.id for m in client.models.list().data] == [str(model_dir), "a", "b"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["models"] == [str(model_dir), "a", "b"]


def test_each_adapter_answers_as_it_does_alone(client, alone, model_dir):
    assert len({alone["a"], alone["b"], alone[str(model_dir)]}) == 3  # the adapters really differ
    for name in ("a", "b", str(model_dir)):
        assert _chat(client, name).strip() == alone[name].strip(), name


def test_streaming_gives_the_same_answer_in_pieces(client, alone):
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="b", messages=ASK, max_tokens=TOKENS, temperature=0,
                                                stream=True):  # fmt: skip
        choice = chunk.choices[0]
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
    assert "".join(pieces).strip() == alone["b"].strip() and len([p for p in pieces if p]) > 1
    assert finish in ("stop", "length")


def test_completions_continue_a_raw_prompt(client):
    r = client.completions.create(model="a", prompt="The quick brown", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5 and r.choices[0].text


def test_interleaved_concurrent_requests_do_not_leak_adapters(client, alone, model_dir):
    names = ["a", "b", str(model_dir)] * 4
    with ThreadPoolExecutor(4) as pool:  # the queue holds 4: no 429 here
        answers = list(pool.map(lambda n: _chat(client, n), names))
    for name, answer in zip(names, answers, strict=True):
        assert answer.strip() == alone[name].strip(), name


def test_bad_requests_are_4xx_in_openai_shape_and_the_server_keeps_serving(client, server, alone):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(client, "nope")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(client, "a", extra_body={"temperature": 5})
    long = [{"role": "user", "content": "boxes " * 3000}]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="a", messages=long, max_tokens=TOKENS)
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _chat(client, "a").strip() == alone["a"].strip()  # still serving


def test_a_full_queue_answers_429(client, server, alone):
    engine = server[1]
    release, done = threading.Event(), __import__("queue").Queue()
    engine.jobs.put(("admin", release.wait, done))  # the worker is busy until released
    time.sleep(0.2)
    fillers = [engine.submit(Job(model="a", prompt_ids=[1, 2, 3], max_tokens=1)) for _ in range(4)]
    with pytest.raises(openai.RateLimitError, match="busy"):
        _chat(client, "a")
    release.set()
    for job in fillers:
        list(job.pieces())
    assert _chat(client, "a").strip() == alone["a"].strip()


def test_adapters_are_added_and_removed_at_run_time(client, server, runs, alone):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        server[0] + "/v1/adapters", json={"name": "c", "path": str(runs["b"])}, headers=headers
    )
    assert r.status_code == 200 and "c" in [m.id for m in client.models.list().data]
    assert _chat(client, "c").strip() == alone["b"].strip()
    assert httpx.delete(server[0] + "/v1/adapters/c", headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _chat(client, "c")
    r = httpx.post(
        server[0] + "/v1/adapters", json={"name": "d", "path": "/nowhere"}, headers=headers
    )
    assert r.status_code == 400 and "not a run folder" in r.json()["error"]["message"]


def test_an_adapter_of_another_base_is_refused(server, tmp_path, data_file):
    from tunelab.testing import tiny_model_dir

    other = tiny_model_dir(tmp_path / "qwen", arch="qwen2")
    run = finetune(config(tmp_path, other, data_file, "train.max_steps=1"), log=quiet)
    r = httpx.post(server[0] + "/v1/adapters", json={"name": "q", "path": str(run)},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400 and "not on the served base" in r.json()["error"]["message"]


def test_serve_command_refuses_bad_adapters_before_serving(model_dir, capsys):
    from tunelab.cli import main

    assert main(["serve", "--model", str(model_dir), "--adapter", "no-equals-sign"]) == 2
    assert "expected name=RUN_DIR" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--adapter", "x=/nowhere"]) == 2
    assert "--adapter x=/nowhere" in capsys.readouterr().err


def _read_until(fd, marker: bytes, timeout: float = 120) -> bytes:
    import os
    import select

    out, deadline = b"", time.time() + timeout
    while marker not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {out!r}")
        try:
            out += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
    return out


def test_chat_through_a_pseudo_terminal(runs, alone):
    """Type a question, read the streamed reply (the adapter's greedy answer), /reset, /exit."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "chat", str(runs["b"]), "--temperature", "0",
                             "--max-tokens", str(TOKENS)], stdin=slave, stdout=slave, stderr=slave)  # fmt: skip
    os.close(slave)
    try:
        assert b"/reset starts a new conversation" in _read_until(master, b"you> ")
        os.write(master, (ASK[0]["content"] + "\n").encode())
        reply = _read_until(master, b"you> ").decode()
        answer = reply.split("model> ", 1)[1].rsplit("you> ", 1)[0].strip()
        assert answer == alone["b"].strip()
        os.write(master, b"/reset\n")
        assert b"(new conversation)" in _read_until(master, b"you> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
