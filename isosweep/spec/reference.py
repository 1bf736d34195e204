"""The spec reference (every field, its type, default and meaning) generated from the schema, so the
table in docs/spec.md cannot drift from `SweepSpec` (tests/test_readme.py compares them)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from isosweep.spec.load import EXTENDS
from isosweep.spec.sections import Distribution, SweepSpec


def _type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if args:
        inner = [_type_name(a) for a in args if a is not type(None)]
        name = getattr(origin, "__name__", "") if origin not in (typing.Union, types.UnionType) else ""
        text = f"{name}[{', '.join(inner)}]" if name else " or ".join(inner)
        return text + (" or null" if type(None) in args else "")
    return getattr(ann, "__name__", str(ann))


def _section_of(ann: Any) -> type[BaseModel] | None:
    """The section class a field holds (`X` or `X | None`), or None for a plain value or a distribution."""
    candidates = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
    if len(candidates) == 1 and isinstance(candidates[0], type) and issubclass(candidates[0], BaseModel) \
            and candidates[0] is not Distribution:
        return candidates[0]
    return None


def _walk_fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        ann = info.annotation
        sub = _section_of(ann)
        path = f"{prefix}{name}"
        if sub is not None:
            if type(None) in typing.get_args(ann):  # an optional section: its own row says it may be null
                yield path, f"{sub.__name__} or null", "`None`", (info.description or "")
            yield from _walk_fields(sub, path + ".")
            continue
        if info.is_required():
            default = "(required)"
        else:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", exclude_none=True)
            default = f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"
        type_name = _type_name(ann)
        if ann is Distribution:
            type_name = "distribution"
        yield path, type_name, default, (info.description or "")


def spec_reference_markdown() -> str:
    """The spec reference table (every field, its type, default and meaning), generated from the schema."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|",
             f"| `{EXTENDS}` | str or null | `None` | a parent spec, relative to this file's folder, that this file's keys are laid "
             "over (mappings merge, lists and values replace); merged before validation and never saved with a sweep |"]
    for path, type_name, default, desc in _walk_fields(SweepSpec):
        type_name = type_name.replace("|", "or")
        lines.append(f"| `{path}` | {type_name} | {default.replace('|', '/')} | {desc.replace('|', '/')} |")
    return "\n".join(lines)
