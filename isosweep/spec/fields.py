"""What every section of the spec shares, below the schema itself (`sections.py`): the strict section base,
`SpecError` and its messages, and the `--set key.path=value` parser.

Rules every section gets from `Section`, whatever its fields:
- unknown keys are refused (a misspelt key is an error, not ignored);
- every float is finite: `inf`, `.inf`, `nan` and `.nan` are refused wherever a float is expected;
- a YAML 1.1 boolean word given to a field whose allowed values are strings is read back as the word:
  `mixed_precision: no` is parsed by YAML as False and becomes "no" (the one allowed value among
  no/false/off), so it is not refused as a wrong type.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# What YAML 1.1 (PyYAML's safe_load) reads as booleans, lower-cased: `no` is False, `on` is True.
YAML_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}
# A name that becomes a folder (the sweep's under its storage): no '/', never '.' or '..', no leading '-' or '.'.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SpecError(ValueError):
    """A spec that cannot run; the message names the file, the field, the value and the fix."""

    deterministic = True  # not retried (isosweep.errors)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (`X | None` gives [X, NoneType]), or [annotation]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def literal_strings(annotation: Any) -> tuple[str, ...]:
    """The allowed strings of a `Literal[...]` (or `Literal[...] | None`) annotation; () for other types."""
    out: list[str] = []
    for member in _members(annotation):
        if typing.get_origin(member) is Literal:
            out += [a for a in typing.get_args(member) if isinstance(a, str)]
    return tuple(out)


def is_text_field(annotation: Any) -> bool:
    """True when a field takes text only: `str`, a `Literal` of strings, either `| None`; never bool or numbers."""
    members = [m for m in _members(annotation) if m is not type(None)]
    return bool(members) and all(
        m is str or (typing.get_origin(m) is Literal and all(isinstance(a, str) for a in typing.get_args(m))) for m in members
    )


class Section(BaseModel):
    """A spec section: unknown keys refused, floats finite, YAML boolean words read back for string choices."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_bool_words(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not isinstance(value, bool):
                continue
            words = [w for w in literal_strings(field.annotation) if w.lower() in YAML_BOOL_WORDS[value]]
            if len(words) == 1:  # exactly one allowed value YAML could have read as this bool: it was that word
                out = dict(out) if out is data else out
                out[name] = words[0]
        return out


FIXES = {
    "extra_forbidden": "remove it, or check its spelling against the spec reference in docs/spec.md",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
    "greater_than_equal": "raise it to the minimum",
    "greater_than": "raise it above the minimum",
    "less_than_equal": "lower it to the maximum",
    "less_than": "lower it below the maximum",
    "finite_number": "use a finite number (inf and nan are refused)",
    "string_pattern_mismatch": "start with a letter or digit, then use letters, digits, '_', '.' and '-' only "
                               "(it names a folder: '.', '..' and '/' are refused)",
    "string_too_long": "shorten it",
}


def _lookup(data: Any, loc: tuple) -> Any:
    for key in loc:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return data


def format_errors(source: str, exc: ValidationError, data: dict) -> str:
    """One line per problem: the field, pydantic's message, the value given and the fix."""
    lines = [f"{source}: invalid sweep spec ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(str(p) for p in loc) or "<root>"
        value = _lookup(data, loc)
        msg = err["msg"].removeprefix("Value error, ")
        fix = FIXES.get(err["type"], "")
        line = f"  - field '{field}': {msg} (got {value!r})"
        lines.append(line + (f"; fix: {fix}" if fix else ""))
    return "\n".join(lines)


def apply_overrides(data: dict, overrides: list[str], source: str = "--set",
                    text_field: Callable[[list[str]], bool] | None = None) -> dict:
    """Apply `key.path=value` overrides to a nested dict, returning a copy.

    Values are parsed as YAML (`2`, `1e-3`, `[a, b]`, `null`), except where `text_field(path parts)` says the
    field takes text only: there a value YAML would read as a bool or a number stays the text as typed
    (`train.mixed_precision=no` is "no", `name=2024` is "2024"); `null` still means None.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"{source}: '{item}' is not key.path=value; fix: write e.g. search.num_trials=2")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(f"{source}: '{key}' goes through '{part}', which is not a section; fix: check the key path")
            node = nxt
        value = _parse_value(raw, source, key)
        if text_field is not None and value is not None and not isinstance(value, str) and text_field(parts):
            value = raw.strip()
        node[parts[-1]] = value
    return out


def _parse_value(text: str, source: str, key: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: the value of '{key}' is not valid YAML ({exc}); fix: quote it, e.g. {key}='\"...\"'") from None
