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
