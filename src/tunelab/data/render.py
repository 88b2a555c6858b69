"""Render conversations to text through the tokenizer's own chat template.

We never re-implement a model's template: the text is ``tokenizer.apply_chat_template`` (so our
token ids equal what the model sees at inference). A tokenizer without a template (a base model)
gets :data:`DEFAULT_TEMPLATE`, a plain, documented format that ends every assistant turn with
the EOS token so the model learns to stop.
"""

from __future__ import annotations

from tunelab.data.records import Message

#: Used when the tokenizer has no chat template (base models) and the config names none.
#: It starts with BOS (when the tokenizer has one), marks turns with "### User:" /
#: "### Assistant:" headers, and closes each assistant turn with EOS.
DEFAULT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer, template: str | None = None) -> str:
    """Install ``template`` (config) or the default when the tokenizer has none; return which."""
    if template:
        tokenizer.chat_template = template
        return "config"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return "default"


def as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render(tokenizer, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


_PROBE = [
    Message("system", "Be brief."),
    Message("user", "Hi, what's 2 + 2?"),
    Message("assistant", "4."),
    Message("user", "And 3 + 3?"),
]


class Renderer:
    """``render`` at a fraction of the cost, for tokenizing whole datasets.

    ``apply_chat_template`` spends most of its ~50 us per call copying and sanitising its
    inputs. We render the same compiled Jinja template directly, with the same variables, after
    checking on a probe conversation that both give identical text. A message that contains a
    special token's text, or a tokenizer where the check fails, takes the public path.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.specials = [t for t in tokenizer.all_special_tokens if t]
        self._fast = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(tokenizer.chat_template)
            variables = dict(tokenizer.special_tokens_map)

            def fast(messages: list[Message], add_generation_prompt: bool) -> str:
                return compiled.render(
                    messages=as_dicts(messages), tools=None, documents=None,
                    add_generation_prompt=add_generation_prompt, **variables,
                )  # fmt: skip

            same = all(
                fast(msgs, gen) == render(tokenizer, msgs, add_generation_prompt=gen)
                for msgs, gen in ((_PROBE, True), (_PROBE[:3], False))
            )
            self._fast = fast if same else None
        except Exception:  # noqa: BLE001 - any surprise: use the public path
            self._fast = None

    def __call__(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        if self._fast is not None and not any(
            t in m.content for m in messages for t in self.specials
        ):
            return self._fast(messages, add_generation_prompt)
        return render(self.tok, messages, add_generation_prompt=add_generation_prompt)
