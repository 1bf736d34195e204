"""Reading a spec: YAML (with its `extends` chain merged in) and `--set` overrides in, a validated `SweepSpec` out, or
one `SpecError` line naming the file, the field, the value and the fix; and the spec of one trial (its searched keys
written into `train`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from isosweep.files import IMAGE_SUFFIXES, iter_image_files
from isosweep.spec import fields
from isosweep.spec.fields import SpecError, format_errors, is_text_field
from isosweep.spec.sections import POINT_KEYS, RENAMED_FIELDS, TRIAL_KEYS, SweepSpec


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `key.path=value` overrides to a nested dict, returning a copy (`fields.apply_overrides`).

    Values are parsed as YAML, except for fields that take text only (str, or a choice of strings): there the
    text stays as typed, so `--set train.mixed_precision=no` is "no", not YAML's False.
    """
    return fields.apply_overrides(data, overrides, source, text_field=_is_text_path)


def _is_text_path(parts: list[str]) -> bool:
    """Whether `a.b.c` names a field of the schema that takes text only."""
    model: Any = SweepSpec
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        if i == len(parts) - 1:
            return is_text_field(field.annotation)
        model = field.annotation
    return False


def spec_from_dict(data: dict, source: str = "<spec>", check_paths: bool = True) -> SweepSpec:
    """Validate a spec dict; raise SpecError naming the source, the field, the value and the fix."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping of sections (got {type(data).__name__})")
    _refuse_renamed(data, source)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(source, exc, data)) from None
    if check_paths:
        _check_paths(spec, source)
    return spec


def _refuse_renamed(data: dict, source: str) -> None:
    """An old key gets an error naming its new name, instead of pydantic's generic 'extra field'."""
    for (section, old), new in RENAMED_FIELDS.items():
        if isinstance(data.get(section), dict) and old in data[section]:
            raise SpecError(f"{source}: field '{section}.{old}' was renamed to '{section}.{new}' (the metric G of the "
                            f"isometry loss, not an evaluation metric); fix: rename the key to '{new}'")


def resolve_trial_spec(spec: "SweepSpec | dict", trial_params: dict[str, Any] | None = None) -> "SweepSpec":
    """The spec with one trial's lambda_iso / p / iso_metric (and a point's iso_timesteps / seed) written into `train` (validated).

    Other keys of trial_params (`baseline`) are labels and are ignored; an unknown key is an error.
    """
    data = spec.to_dict() if isinstance(spec, SweepSpec) else copy.deepcopy(spec)
    for key, value in (trial_params or {}).items():
        if key == "baseline" or (key in POINT_KEYS and value is None):  # a point that leaves it to `train`
            continue
        if key not in TRIAL_KEYS + POINT_KEYS:
            raise ValueError(f"unknown trial parameter {key!r}; trial parameters are {list(TRIAL_KEYS + POINT_KEYS)}")
        data["train"][key] = value
    return spec_from_dict(data, source="trial config", check_paths=False)


def trial_params_of(config: dict[str, Any]) -> dict[str, Any]:
    """The trial keys and the baseline label of a Tune config (or a results row)."""
    params = {k: config[k] for k in TRIAL_KEYS if k in config}
    params.update({k: config[k] for k in POINT_KEYS if config.get(k) is not None})  # set by a point of search.points
    if "iso_metric" not in params and "metric" in config:  # a trial of a sweep started before the rename
        params["iso_metric"] = config["metric"]
    params["baseline"] = bool(config.get("baseline", False))
    return params


def _check_paths(spec: SweepSpec, source: str) -> None:
    ds = spec.dataset
    if ds.kind == "image_folder" and ds.path and "://" not in ds.path:
        if not Path(os.path.expanduser(ds.path)).is_dir():
            raise SpecError(f"{source}: field 'dataset.path': directory does not exist (got {ds.path!r}); "
                            "fix: point it at the root of the image tree, or --set dataset.path=/data/celebahq")
        if next(iter_image_files(ds.path), None) is None:  # stops at the first image: cheap on 30k files
            raise SpecError(f"{source}: field 'dataset.path': no images ({', '.join(IMAGE_SUFFIXES)}) under it, at any "
                            f"depth (got {ds.path!r}); fix: point it at the folder that holds the images")
    if ds.attributes and not Path(os.path.expanduser(ds.attributes)).is_file():
        raise SpecError(f"{source}: field 'dataset.attributes': file does not exist (got {ds.attributes!r}); fix: give the CSV's path or remove the field")
    src = spec.base_model.source
    looks_local = src.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(os.path.expanduser(src)).exists():
        raise SpecError(f"{source}: field 'base_model.source': path does not exist (got {src!r}); fix: point it at a diffusers model directory")


EXTENDS = "extends"  # the top-level key naming a parent spec, relative to the extending file's folder


def deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, returning a new dict: mappings merge key by key, at any depth; a list, a scalar or a
    null in `over` replaces what `base` had (so `screening: null` drops the parent's section)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary or non-UTF-8 file is a bad spec (exit 2), not a crash
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); fix: save the spec as UTF-8 YAML") from None


def spec_chain(path: str | os.PathLike) -> list[Path]:
    """The spec file and the parents its `extends` names, in order (the file first). The one check of `extends`:
    not a string, a missing parent or a cycle is a SpecError naming the file that says it."""
    return [p for p, _ in _chain(Path(path))]


def _chain(path: Path) -> list[tuple[Path, Any]]:
    chain: list[tuple[Path, Any]] = []
    while True:
        data = _read_yaml(path)
        chain.append((path, data))
        if not isinstance(data, dict) or EXTENDS not in data:
            return chain
        parent = data[EXTENDS]
        if not isinstance(parent, str) or not parent.strip():
            raise SpecError(f"{path}: field '{EXTENDS}' must be the path of the parent spec, relative to this file's folder "
                            f"(got {parent!r}); fix: write e.g. '{EXTENDS}: celebahq.yaml', or remove the key")
        target = path.parent / parent
        if not target.is_file():
            raise SpecError(f"{path}: field '{EXTENDS}': no such spec file {target} (got {parent!r}); fix: give the parent's "
                            f"path relative to {path.parent}, e.g. '{EXTENDS}: celebahq.yaml'")
        seen = [p.resolve() for p, _ in chain]
        if target.resolve() in seen:
            loop = " -> ".join(str(p) for p, _ in chain[seen.index(target.resolve()):]) + f" -> {target}"
            raise SpecError(f"{path}: field '{EXTENDS}' makes a cycle ({loop}); fix: remove '{EXTENDS}' from one of these files")
        path = target


def resolve_spec_data(path: str | os.PathLike) -> Any:
    """The spec file's YAML with its `extends` chain merged in (parents first, `deep_merge`), without the `extends`
    key: the form that is validated, saved with a sweep and shipped with a job, so neither depends on the parents."""
    chain = _chain(Path(path))
    for parent, data in chain[1:]:
        if not isinstance(data, dict):
            raise SpecError(f"{parent}: the top level must be a mapping of sections (got {type(data).__name__}); it is "
                            f"the parent spec of {chain[0][0]}; fix: make it a spec, or remove '{EXTENDS}'")
    merged: Any = {}
    for _, data in reversed(chain):
        if not isinstance(data, dict):  # only the file itself can be here: spec_from_dict names it
            return data
        merged = deep_merge(merged, {k: v for k, v in data.items() if k != EXTENDS})
    return merged


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None, check_paths: bool = True) -> SweepSpec:
    """Read a YAML spec file and the parents it `extends`, merge them, apply `--set` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file; fix: give the path of a YAML spec such as search_spaces/demo.yaml")
    data = resolve_spec_data(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return spec_from_dict(data, source=str(path), check_paths=check_paths)


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the search will run, the baseline included (a grid runs every combination)."""
    s = spec.search
    if s.algorithm == "points":
        return 1 + len(s.points)
    if s.algorithm != "grid":
        return s.num_trials + 1
    combinations = 1
    for key in TRIAL_KEYS:
        combinations *= len(getattr(s, key).values)
    return 1 + s.num_trials * combinations
