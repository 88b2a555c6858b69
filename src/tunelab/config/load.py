"""Load a :class:`Config` from YAML plus dotted overrides, with errors a person can act on.

``load_config("run.yaml", ["data.max_seq_len=512", "data.format=chat"])``

Errors name the file, the line (when the key came from the file), the dotted key, and what is
allowed: ``run.yaml:7: data.truncation: 'cut' is not allowed (expected one of: drop, ...)``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import Config
from tunelab.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        raw, lines = _read_yaml(Path(path))
    origin: dict[tuple, str] = {}
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, item)
        origin[key] = item
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, lines, origin)) from None


def flag_overrides(section: str, **flags: Any) -> list[str]:
    """Command-line flags as dotted overrides of ``section`` (flags left unset are skipped).
    ``ensure_ascii=False``: YAML would turn a JSON surrogate pair (an emoji) into two lone halves."""
    return [
        f"{section}.{k}={json.dumps(v, ensure_ascii=False)}"
        for k, v in flags.items()
        if v is not None
    ]


def dump_config(config: Config) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# -- reading --------------------------------------------------------------------------------
def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 at byte offset {e.start}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, data:, ...), found {type(data).__name__}"
        )
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node, prefix: tuple, out: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)


def _parse_override(item: str) -> tuple[tuple, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(
            f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. data.max_seq_len=512"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def _set_dotted(raw: dict, key: tuple, value: Any, item: str) -> None:
    node = raw
    for i, part in enumerate(key[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {item!r}: {'.'.join(key[: i + 1])} is a value, not a section"
            )
        node = child
    node[key[-1]] = value


# -- errors ---------------------------------------------------------------------------------
def _format_errors(
    e: ValidationError, source: str, lines: dict[tuple, int], origin: dict[tuple, str]
) -> str:
    out = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        if loc in origin:
            where = f"override {origin[loc]!r}"
        elif loc in lines:
            where = f"{source}:{lines[loc]}"
        else:
            where = source
        out.append(f"{where}: {dotted}: {_explain(err, loc)}")
    return "\n".join(out)


def _explain(err: dict, loc: tuple) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key (allowed: {', '.join(allowed)}){hint}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{got!r} is not allowed (expected one of: {expected.replace(' or ', ', ')})"
    msg = err["msg"]
    if kind.startswith("value_error"):
        return msg.removeprefix("Value error, ")
    if kind == "missing":
        return "missing"
    return f"{msg[0].lower() + msg[1:]} (got {got!r})"


def _allowed_keys(section: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in section:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
