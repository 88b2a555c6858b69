"""Record formats: detect, validate and normalise rows into :class:`Example`.

Every format becomes a conversation (a list of :class:`Message`), so rendering and tokenizing
have one path:

============  ====================================================================
format        fields
============  ====================================================================
alpaca        instruction, output; optional input, system, history ([[user, assistant], ...])
chat          messages: [{role: system|user|assistant, content, weight?: 0|1}]
preference    prompt, chosen, rejected (strings or chat messages);
              also question / positive_answer / negative_answer
kto           instruction (+ input), output, kto_tag (true/false)
text          text (continued pre-training: every token is trained)
============  ====================================================================

Problems are collected for every bad row (``file:line: field: what is wrong (expected ...)``)
and raised together as one :class:`~tunelab.errors.DataError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tunelab.config.schema import RECORD_FIELDS
from tunelab.data.read import Row, Source
from tunelab.errors import DataError, Problem

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "chat", "preference", "kto", "text")
FORMAT_FIELDS = {
    "alpaca": "instruction, output [, input, system, history]",
    "chat": "messages [, system]",
    "preference": "prompt, chosen, rejected  (or question, positive_answer, negative_answer)",
    "kto": "instruction, output, kto_tag [, input, system]",
    "text": "text",
}
KNOWN_FIELDS = set(RECORD_FIELDS)  # defined with the config, which validates data.columns
ALIASES = {"question": "prompt", "positive_answer": "chosen", "negative_answer": "rejected"}


@dataclass(slots=True)
class Message:
    role: str
    content: str
    weight: float | None = None  # None: the default for the role; 0/1: set by the record


@dataclass(slots=True)
class Example:
    """One validated record in the shape every later stage uses."""

    source: Source
    format: str
    messages: list[Message]  # the prompt for preference rows, the whole conversation otherwise
    chosen: str | None = None  # preference only
    rejected: str | None = None  # preference only
    label: bool | None = None  # kto only
    text: str | None = None  # text only
    extra: dict = field(default_factory=dict)  # fields we do not use, kept for writing back

    @property
    def prompt_key(self) -> str:
        """The prompt side as one string (dedup, overlap, diversity)."""
        if self.format == "text":
            return self.text or ""
        msgs = self.messages if self.format == "preference" else self.messages[:-1]
        return "\n".join(m.content for m in msgs if m.role != "system")

    @property
    def identity(self) -> tuple:
        """Equal for exact duplicates (what ``data.dedup`` removes and ``data check`` counts)."""
        return (self.format, self.prompt_key, self.response, self.rejected, self.label)

    @property
    def response(self) -> str:
        if self.format == "text":
            return ""
        if self.format == "preference":
            return self.chosen or ""
        return self.messages[-1].content

    @property
    def instruction(self) -> str:
        """The last user message: what diversity statistics look at."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return self.text or ""


class _RowError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message


def parse_examples(
    rows: Iterable[Row],
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_problems: int = 20,
) -> list[Example]:
    """Validate rows; raise one DataError listing every bad row (message capped)."""
    remap = {src: dst for dst, src in (columns or {}).items()}
    examples: list[Example] = []
    problems: list[Problem] = []
    total_bad = 0
    for row in rows:
        try:
            examples.append(_parse_row(row, format, remap, system_prompt))
        except _RowError as e:
            total_bad += 1
            if len(problems) < max_problems:
                problems.append(Problem(row.source.file, row.source.line, e.field, e.message))
    if problems:
        raise DataError(problems, total=total_bad, cap=max_problems)
    return examples


def detect_format(fields: Mapping) -> str | None:
    keys = fields.keys()
    if "messages" in keys:
        return "chat"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "kto_tag" in keys:
        return "kto"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def _parse_row(row: Row, format: str, remap: dict[str, str], system_prompt: str | None) -> Example:
    fields = {remap.get(k, ALIASES.get(k, k)): v for k, v in row.fields.items()}
    fmt = detect_format(fields) if format == "auto" else format
    if fmt is None:
        raise _RowError(None, _unknown_format_message(row.fields))
    extra = {k: v for k, v in fields.items() if k not in KNOWN_FIELDS}
    system = _optional_str(fields, "system") or system_prompt
    if fmt == "chat":
        messages = _chat_messages(fields.get("messages"), "messages", system)
        _require_ends_with_assistant(messages, "messages")
        return Example(row.source, "chat", messages, extra=extra)
    if fmt in ("alpaca", "kto"):
        messages = _alpaca_messages(fields, system)
        label = _kto_tag(fields) if fmt == "kto" else None
        return Example(row.source, fmt, messages, label=label, extra=extra)
    if fmt == "preference":
        return _preference(row.source, fields, system, extra)
    if fmt == "text":
        return Example(row.source, "text", [], text=_required_str(fields, "text"), extra=extra)
    raise _RowError("format", f"unknown format {format!r} (expected one of: {', '.join(FORMATS)})")


def _unknown_format_message(fields: Mapping) -> str:
    found = ", ".join(sorted(fields)) or "none"
    hints = []
    for k in fields:
        close = difflib.get_close_matches(
            str(k), sorted(KNOWN_FIELDS | set(ALIASES)), n=1, cutoff=0.75
        )
        if close:
            hints.append(f"'{k}' -> '{close[0]}'?")
    expected = "; ".join(f"{name} ({f})" for name, f in FORMAT_FIELDS.items())
    msg = f"cannot tell the record format from the fields found [{found}] (expected one of: {expected})"
    if hints:
        msg += f"; did you mean {', '.join(hints)}"
    return msg + "; remap names with data.columns"


def _missing(fields: Mapping, name: str) -> _RowError:
    found = ", ".join(sorted(fields))
    close = difflib.get_close_matches(name, [str(k) for k in fields], n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return _RowError(name, f"missing (fields found: {found}){hint}")


def _required_str(fields: Mapping, name: str) -> str:
    if name not in fields or fields[name] is None:
        raise _missing(fields, name)
    return _nonempty_str(fields[name], name)


def _nonempty_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string, got {_type(value)}")
    if not value.strip():
        raise _RowError(name, "is empty (expected non-empty text)")
    return value


def _optional_str(fields: Mapping, name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string, got {_type(value)}")
    return value


def _type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _chat_messages(value: object, name: str, system: str | None) -> list[Message]:
    if not isinstance(value, list):
        raise _RowError(name, f"expected a list of messages, got {_type(value)}")
    if not value:
        raise _RowError(name, "is empty (expected at least a user and an assistant message)")
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _RowError(where, f"expected an object with role and content, got {_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            got = "missing" if role is None else repr(role)
            raise _RowError(
                f"{where}.role", f"{got} is not a role (expected one of: {', '.join(ROLES)})"
            )
        content = m.get("content")
        if content is None:
            raise _RowError(f"{where}.content", "missing")
        if role == "system":
            if not isinstance(content, str):
                raise _RowError(f"{where}.content", f"expected a string, got {_type(content)}")
            if i != 0:
                raise _RowError(f"{where}.role", "a system message may only come first")
            if content.strip():
                out.append(Message("system", content))
            continue
        content = _nonempty_str(content, f"{where}.content")
        weight = m.get("weight")
        if weight is not None:
            if role != "assistant":
                raise _RowError(f"{where}.weight", "only assistant messages take a weight")
            if weight not in (0, 1) or isinstance(weight, bool):
                raise _RowError(f"{where}.weight", f"expected 0 or 1, got {weight!r}")
            weight = float(weight)
        out.append(Message(role, content, weight))
    roles = [m.role for m in out if m.role != "system"]
    if not roles or roles[0] != "user":
        raise _RowError(name, "the first message after the system prompt must be from the user")
    if system and out[0].role != "system":
        out.insert(0, Message("system", system))
    return out


def _require_ends_with_assistant(messages: list[Message], name: str) -> None:
    if messages[-1].role != "assistant":
        raise _RowError(
            name,
            f"the conversation ends with a {messages[-1].role} message "
            "(expected it to end with the assistant's reply, which is what gets trained)",
        )


def _alpaca_messages(fields: Mapping, system: str | None) -> list[Message]:
    instruction = _required_str(fields, "instruction")
    output = _required_str(fields, "output")
    extra_input = _optional_str(fields, "input")
    messages = [Message("system", system)] if system else []
    history = fields.get("history")
    if history:
        if not isinstance(history, list):
            raise _RowError(
                "history", f"expected a list of [user, assistant] pairs, got {_type(history)}"
            )
        for i, pair in enumerate(history):
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise _RowError(f"history[{i}]", "expected a [user, assistant] pair")
            messages.append(Message("user", _nonempty_str(pair[0], f"history[{i}][0]")))
            messages.append(Message("assistant", _nonempty_str(pair[1], f"history[{i}][1]")))
    prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    messages += [Message("user", prompt), Message("assistant", output)]
    return messages


def _kto_tag(fields: Mapping) -> bool:
    if "kto_tag" not in fields:
        raise _missing(fields, "kto_tag")
    tag = fields["kto_tag"]
    if isinstance(tag, bool):
        return tag
    if isinstance(tag, str) and tag.strip().lower() in ("true", "false"):
        return tag.strip().lower() == "true"
    raise _RowError("kto_tag", f"expected true or false, got {tag!r}")


def _response(value: object, name: str) -> tuple[list[Message] | None, str]:
    """A chosen/rejected value: a string, one assistant message, or a conversation."""
    if isinstance(value, str):
        return None, _nonempty_str(value, name)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        msgs = (
            _chat_messages(value, name, None)
            if value and value[0].get("role") != "assistant"
            else None
        )
        if msgs is None:  # a bare assistant message list
            last = value[-1] if value else None
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise _RowError(name, "expected the assistant's reply")
            return None, _nonempty_str(last.get("content"), f"{name}.content")
        _require_ends_with_assistant(msgs, name)
        return msgs[:-1], msgs[-1].content
    raise _RowError(name, f"expected a string or chat messages, got {_type(value)}")


def _preference(source: Source, fields: Mapping, system: str | None, extra: dict) -> Example:
    for name in ("chosen", "rejected"):
        if name not in fields or fields[name] is None:
            raise _missing(fields, name)
    chosen_prefix, chosen = _response(fields["chosen"], "chosen")
    rejected_prefix, rejected = _response(fields["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise _RowError("rejected", "is the same answer as chosen: the pair prefers nothing")
    prompt = fields.get("prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            messages = [Message("user", _nonempty_str(prompt, "prompt"))]
        else:
            messages = _chat_messages(prompt, "prompt", None)
            if messages[-1].role != "user":
                raise _RowError("prompt", "the prompt must end with a user message")
    elif chosen_prefix:
        if rejected_prefix is not None and [(m.role, m.content) for m in rejected_prefix] != [
            (m.role, m.content) for m in chosen_prefix
        ]:
            raise _RowError(
                "rejected", "chosen and rejected conversations differ before the last reply"
            )
        messages = chosen_prefix
    else:
        raise _missing(fields, "prompt")
    if system and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    return Example(source, "preference", messages, chosen=chosen, rejected=rejected, extra=extra)
