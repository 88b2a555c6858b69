"""Turn examples into token ids and per-token loss weights.

The rules (``docs/data.md`` explains why):

* The text is the tokenizer's chat template rendering, tokenized without adding special tokens
  (exactly what ``apply_chat_template(tokenize=True)`` gives), so there is one BOS.
* Tokens of a trained assistant reply weigh 1.0, and so does the special token that closes the
  reply (the EOS / end-of-turn), even when the pad token equals EOS: weights live in their own
  tensor, never inferred from ``input_ids != pad``.
* Everything else (system, user, template scaffolding, untrained earlier replies with
  ``train_on: last``) weighs ``prompt_loss_weight``; an assistant message with ``weight: 0``
  weighs 0.
* Whitespace the template puts after the final closing token is cut, so every sequence ends in
  its trained EOS; a template with no closing token gets the EOS appended.
* Over-long sequences follow the truncation policy, and a sequence with no token of weight 1
  is never produced: it is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tunelab.data.records import Example, Message
from tunelab.data.render import Renderer
from tunelab.errors import DataError, Problem

TRUNCATION = ("drop", "truncate_prompt", "truncate", "error")
TRAIN_ON = ("all", "last")


@dataclass(slots=True)
class Encoded:
    """One tokenized sequence: ids and the loss weight of each token (as a target)."""

    input_ids: np.ndarray  # int64 [T]
    weights: np.ndarray  # float32 [T]
    response: np.ndarray  # bool [T]: tokens of a trained reply, incl. its closing EOS

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class TokenizedExample:
    example: Example
    seq: Encoded  # the conversation (preference: prompt + chosen)
    rejected: Encoded | None = None  # preference: prompt + rejected
    # Filled by a preference objective before training (tunelab.train.objectives):
    kl: Encoded | None = None  # kto: this prompt with another example's answer (the KL estimate)
    ref: tuple[float, ...] | None = None  # reference log-probabilities of the rows it scores


@dataclass
class EncodeReport:
    examples: list[TokenizedExample]
    lengths: list[int] = field(
        default_factory=list
    )  # before truncation, one per kept-or-not example
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count


@dataclass(frozen=True)
class EncodeOptions:
    prompt_loss_weight: float = 0.1
    train_on: str = "all"
    max_seq_len: int | None = None
    truncation: str = "drop"


def encode(
    examples: Sequence[Example],
    tokenizer,
    options: EncodeOptions = EncodeOptions(),
    *,
    chunk: int = 2048,
    on_progress: Callable[[int], None] | None = None,
) -> EncodeReport:
    """Tokenize examples in batches; apply the truncation policy; count what was dropped."""
    encoder = _Encoder(tokenizer, options)
    report = EncodeReport(examples=[])
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        encoder.encode_chunk(part, report)
        if on_progress:
            on_progress(len(part))
    if not report.examples and examples:
        reasons = "; ".join(f"{n} {why}" for why, n in report.dropped.most_common())
        raise DataError(
            Problem(
                examples[0].source.file, None, None, f"no example is left to train on ({reasons})"
            )
        )
    return report


class _Encoder:
    def __init__(self, tokenizer, options: EncodeOptions):
        if options.truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}")
        if options.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}")
        self.tok = tokenizer
        self.opt = options
        self.eos = tokenizer.eos_token_id
        self.render = Renderer(tokenizer)
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batch encode, char maps
        vocab = max(len(tokenizer), self.backend.get_vocab_size(with_added_tokens=True))
        self.is_special = np.zeros(vocab + 1, dtype=bool)
        self.is_special[sorted(set(tokenizer.all_special_ids) | _added_special_ids(tokenizer))] = (
            True
        )
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.text_bos = tokenizer.bos_token_id if probe[:1] == [tokenizer.bos_token_id] else None

    # -- one chunk ---------------------------------------------------------------------------
    def encode_chunk(self, examples: Sequence[Example], report: EncodeReport) -> None:
        texts: list[str] = []
        spans: list[list[tuple[int, int, float]]] = []
        owners: list[int] = []
        for i, ex in enumerate(examples):
            for text, sp in self._texts(ex):
                texts.append(text)
                spans.append(sp)
                owners.append(i)
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        seqs: dict[int, list[Encoded | None]] = {}
        lengths: dict[int, int] = {}
        reasons: dict[int, str] = {}
        for j, owner in enumerate(owners):
            ex = examples[owner]
            seq, why = self._weights(texts[j], encodings[j], spans[j], ex)
            length = len(seq) if seq is not None else len(encodings[j].ids)
            lengths[owner] = max(lengths.get(owner, 0), length)
            if seq is not None:
                seq, why = self._truncate(seq, ex, report)
            if seq is None:
                reasons.setdefault(owner, why)
            seqs.setdefault(owner, []).append(seq)
        for i, ex in enumerate(examples):
            report.lengths.append(lengths[i])
            if i in reasons:
                report.dropped[reasons[i]] += 1
                continue
            parts = seqs[i]
            report.examples.append(
                TokenizedExample(ex, parts[0], parts[1] if len(parts) > 1 else None)
            )

    # -- text and spans ----------------------------------------------------------------------
    def _texts(self, ex: Example) -> list[tuple[str, list[tuple[int, int, float]]]]:
        if ex.format == "text":
            return [(ex.text or "", [])]
        if ex.format == "preference":
            return [
                self._conversation(ex.messages + [Message("assistant", ex.chosen or "")], True),
                self._conversation(ex.messages + [Message("assistant", ex.rejected or "")], True),
            ]
        return [self._conversation(ex.messages, last_only=ex.format == "kto")]

    def _reply_weight(self, messages: list[Message], i: int) -> float:
        m = messages[i]
        if m.weight is not None:
            return m.weight
        if self.opt.train_on == "last" and i != len(messages) - 1:
            return self.opt.prompt_loss_weight
        return 1.0

    def _conversation(
        self, messages: list[Message], last_only: bool = False
    ) -> tuple[str, list[tuple[int, int, float]]]:
        """Render once and locate each reply's content in the text (fast path), else fall back
        to rendering growing prefixes (templates that rewrite the content). ``last_only``: the
        final reply is the answer and earlier assistant turns are prompt (preference and KTO
        records: the answer is what is judged, whatever ``data.train_on`` says)."""
        text = self.render(messages)
        spans: list[tuple[int, int, float]] = []
        cursor = 0
        for i, m in enumerate(messages):
            pos = text.find(m.content, cursor)
            if pos < 0:
                return text, self._prefix_spans(text, messages, last_only)
            cursor = pos + len(m.content)
            if m.role == "assistant" and not (last_only and i != len(messages) - 1):
                spans.append((pos, cursor, self._reply_weight(messages, i)))
        return text, spans

    def _prefix_spans(
        self, text: str, messages: list[Message], last_only: bool = False
    ) -> list[tuple[int, int, float]]:
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant" or (last_only and i != len(messages) - 1):
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(head)):
                raise DataError(
                    Problem(
                        "chat template",
                        None,
                        None,
                        "renders conversations in a way that cannot be split into turns",
                    )
                )
            spans.append((len(head), len(upto.rstrip()), self._reply_weight(messages, i)))
        return spans

    # -- weights -----------------------------------------------------------------------------
    def _weights(self, text: str, enc, spans, ex: Example) -> tuple[Encoded | None, str]:
        ids = np.array(enc.ids, dtype=np.int64)
        n = len(ids)
        if ex.format == "text":
            if self.text_bos is not None and (n == 0 or ids[0] != self.text_bos):
                ids = np.insert(ids, 0, self.text_bos)
            if self.eos is not None and (len(ids) == 0 or ids[-1] != self.eos):
                ids = np.append(ids, self.eos)
            return Encoded(ids, np.ones(len(ids), np.float32), np.ones(len(ids), bool)), ""
        w = np.full(n, self.opt.prompt_loss_weight, dtype=np.float32)
        resp = np.zeros(n, dtype=bool)
        special = self.is_special[ids]
        last_closer = -1
        for s, e, weight in spans:
            first, last = _token_at(enc, s, e, +1), _token_at(enc, e - 1, s - 1, -1)
            if first is None or last is None or last < first:
                continue
            w[first : last + 1] = weight
            resp[first : last + 1] = weight > 0
            j = last + 1
            if special[last]:  # a span from prefix rendering already ends with its closer
                j, e = last, enc.token_to_chars(last)[0]
            # The special token that closes the reply (EOS / end-of-turn), skipping only whitespace.
            while j < n and not special[j] and not _token_text(text, enc, j).strip():
                j += 1
            if j < n and special[j] and not text[e : enc.token_to_chars(j)[0]].strip():
                w[j], resp[j] = weight, weight > 0
                last_closer = j
            elif j >= n or not text[e:].strip():
                last_closer = -2  # the template closes nothing after the last reply
        if last_closer >= 0 and not text[enc.token_to_chars(last_closer)[1] :].strip():
            ids, w, resp = ids[: last_closer + 1], w[: last_closer + 1], resp[: last_closer + 1]
        elif last_closer == -2 and self.eos is not None and spans and spans[-1][2] > 0:
            ids, w = np.append(ids, self.eos), np.append(w, np.float32(spans[-1][2]))
            resp = np.append(resp, True)
        if not resp.any():
            return None, "have no trained response token (every assistant turn has weight 0)"
        return Encoded(ids, w, resp), ""

    # -- truncation --------------------------------------------------------------------------
    def _truncate(
        self, seq: Encoded, ex: Example, report: EncodeReport
    ) -> tuple[Encoded | None, str]:
        limit = self.opt.max_seq_len
        if limit is None or len(seq) <= limit:
            return seq, ""
        policy = self.opt.truncation
        if policy == "error":
            raise DataError(
                Problem(ex.source.file, ex.source.line, None,
                        f"{len(seq)} tokens, more than max_seq_len {limit} (truncation: error)")
            )  # fmt: skip
        if policy == "drop":
            return None, f"are longer than max_seq_len {limit} (truncation: drop)"
        if policy == "truncate":
            out = Encoded(seq.input_ids[:limit], seq.weights[:limit], seq.response[:limit])
        else:  # truncate_prompt: cut the prompt from the left, after a leading BOS
            first = int(np.flatnonzero(seq.response)[0])
            head = (
                1
                if self.tok.bos_token_id is not None and seq.input_ids[0] == self.tok.bos_token_id
                else 0
            )
            excess = len(seq) - limit
            if first - head < excess:
                return (
                    None,
                    f"have a response longer than max_seq_len {limit} (truncation: truncate_prompt)",
                )
            keep = np.r_[0:head, head + excess : len(seq)]
            out = Encoded(seq.input_ids[keep], seq.weights[keep], seq.response[keep])
        if not out.response.any():
            return (
                None,
                f"have no trained token left after truncating to {limit} (truncation: {policy})",
            )
        report.truncated += 1
        return out, ""


def _token_at(enc, pos: int, stop: int, step: int) -> int | None:
    """The token covering character ``pos``, walking by ``step`` past characters no token
    covers (offsets trimmed of spaces) until ``stop``."""
    while pos != stop:
        t = enc.char_to_token(pos)
        if t is not None:
            return t
        pos += step
    return None


def _token_text(text: str, enc, j: int) -> str:
    a, b = enc.token_to_chars(j)
    return text[a:b]


def _added_special_ids(tokenizer) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i for i, t in decoder.items() if getattr(t, "special", False)}
