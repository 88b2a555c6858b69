"""What is trained: one module per method, each a :class:`~.base.Method`.

    full     every parameter                                   (full.py)
    freeze   the last N layers (+ named modules), progressive  (freeze.py)
    lora     PEFT LoRA adapters on a frozen base               (lora.py)
    qlora    LoRA on a 4/8-bit quantised base (bitsandbytes)   (lora.py)

The rest of tunelab holds a ``Method`` object and calls its methods; only this package knows the
names (see docs/methods.md).
"""

from __future__ import annotations

from tunelab.config.schema import MethodConfig
from tunelab.models.methods.base import Method, count_parameters


def _classes() -> dict[str, type[Method]]:
    from tunelab.models.methods.freeze import Freeze
    from tunelab.models.methods.full import Full
    from tunelab.models.methods.lora import LoRA, QLoRA

    return {m.name: m for m in (Full, Freeze, LoRA, QLoRA)}


def get_method(cfg: MethodConfig) -> Method:
    """The method object for ``cfg`` (``cfg.name`` is already validated by the config)."""
    return _classes()[cfg.name](cfg)


def summary_fields(name: str) -> tuple[str, ...]:
    """The settings of method ``name`` worth showing in a summary ((): an unknown name)."""
    method = _classes().get(name)
    return method.summary_fields if method else ()


__all__ = ["Method", "count_parameters", "get_method", "summary_fields"]
