"""One base model in memory and any number of LoRA adapters on it (PEFT's multi-adapter model),
answering requests one at a time from a bounded queue.

A single worker thread owns the model: for each request it activates exactly the adapter the
request names (or disables them all for the base) and generates; nothing else touches the
weights, so no request can see another's adapter. Adding or removing an adapter is a job in
the same queue, done between requests. A full queue is refused at once (the server answers
429) instead of growing without bound.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.evaluate.generate import stop_ids
from tunelab.models.load import load_model, resolve_model, run_adapter

DONE = object()  # the end of a job's stream


class Busy(TunelabError):
    """The request queue is full."""


class RequestError(TunelabError):
    """A request the engine cannot serve (its text is the message the client gets)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Job:
    model: str  # the base's name or an adapter's
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then DONE (or an error)
    completion_tokens: int = 0
    finish_reason: str = "stop"

    def pieces(self):
        """The generated text as it comes (blocks); raises what the worker raised."""
        while True:
            item = self.stream.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    def __init__(self, base: str, *, device: str = "auto", max_queue: int = 16):
        self.base = base
        target = (
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        dtype = torch.bfloat16 if target == "cuda" else torch.float32
        self.model, self.tokenizer = load_model(base, dtype=dtype, device=target)
        self.model.eval()
        self.stops = stop_ids(self.tokenizer)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.adapters: dict[str, Path] = {}
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.created = int(time.time())
        self._worker = threading.Thread(target=self._run, name="tunelab-serve", daemon=True)
        self._worker.start()

    # -- what the server asks -------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return [self.base, *self.adapters]

    def submit(self, job: Job) -> Job:
        if job.model not in self.models:
            raise RequestError(f"The model '{job.model}' does not exist (served: {', '.join(self.models)})",
                               param="model", code="model_not_found")  # fmt: skip
        if len(job.prompt_ids) + job.max_tokens > self.context:
            raise RequestError(
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{len(job.prompt_ids)} and max_tokens asks for {job.max_tokens} more",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(
                f"the server is busy: {self.jobs.maxsize} requests are waiting; retry later"
            ) from None
        return job

    def add_adapter(self, name: str, run: Path) -> None:
        """Load the adapter of run folder ``run`` as ``name`` (between requests)."""
        if name in self.models:
            raise RequestError(f"a model named '{name}' is already served", param="name")
        adapter = run_adapter(str(run))
        if adapter is None:
            raise RequestError(
                f"{run}: not a run folder that ended as a LoRA adapter", param="path"
            )
        if resolve_model(adapter[0]) != resolve_model(self.base):
            raise RequestError(
                f"{run} was trained on {adapter[0]}, not on the served base {self.base}",
                param="path",
            )
        self._admin(lambda: self._load_adapter(name, adapter[1]))
        self.adapters[name] = Path(run)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise RequestError(f"no adapter named '{name}' (adapters: {', '.join(self.adapters) or 'none'})",
                               param="name", code="model_not_found")  # fmt: skip
        del self.adapters[name]  # new requests for it are refused from now on
        self._admin(lambda: self.model.delete_adapter(name))

    def prompt_ids(
        self, messages: list[dict] | None = None, prompt: str | None = None
    ) -> list[int]:
        if messages is not None:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))  # fmt: skip
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # -- the worker -----------------------------------------------------------------------------
    def _admin(self, action) -> None:
        done: queue.Queue = queue.Queue()
        self.jobs.put(("admin", action, done))  # waits for room: an admin change is never refused
        result = done.get()
        if isinstance(result, BaseException):
            raise result

    def _load_adapter(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if not hasattr(self.model, "peft_config"):
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name).eval()
        else:
            self.model.load_adapter(folder, adapter_name=name)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if isinstance(job, tuple):  # an adapter added or removed
                _, action, done = job
                try:
                    action()
                    done.put(None)
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    done.put(e)
                continue
            try:
                self._generate(job)
                job.stream.put(DONE)
            except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
                job.stream.put(e)

    def _generate(self, job: Job) -> None:
        ids = torch.tensor([job.prompt_ids], device=self.model.device)
        sample = job.temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_tokens,
                      do_sample=sample, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stops,
                      streamer=_Pieces(self.tokenizer, job))  # fmt: skip
        if sample:
            kwargs.update(temperature=job.temperature, top_p=job.top_p)
            torch.manual_seed(job.seed if job.seed is not None else int(time.time_ns() % 2**31))
        with torch.no_grad(), self._adapter(job.model):
            out = self.model.generate(**kwargs)
        new = out.shape[1] - ids.shape[1]
        job.completion_tokens = new
        job.finish_reason = (
            "length" if new >= job.max_tokens and int(out[0, -1]) not in self.stops else "stop"
        )

    def _adapter(self, name: str):
        """The context in which exactly ``name``'s weights are active."""
        if not self.adapters and not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if name == self.base:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()


class _Pieces:
    """A transformers streamer that hands the job each new piece of decoded text (the whole
    text decoded each time, so a character split across tokens comes out whole)."""

    def __init__(self, tokenizer, job: Job):
        self.tokenizer, self.job = tokenizer, job
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stops = set(stop_ids(tokenizer))

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i not in self.stops]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a character: wait for the rest
        if len(text) > len(self.sent):
            self.job.stream.put(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass
