"""What a resume may change: the spec a sweep ran with against the one it is resumed with.

A sweep is resumed with the spec it ran with (saved in its storage). Any difference in a field that
changes results (the data, the model, training, evaluation, the search) is refused, with the fields
listed: one sweep must not mix settings. Fields that only change how or where the sweep runs
(`OPERATIONAL_FIELDS`) may change with `--allow-changes`, since a resume on another cluster may need
another concurrency, cache folder or mount point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from isosweep.redact import scrub_tree
from isosweep.spec.fields import SpecError
from isosweep.spec.load import spec_from_dict
from isosweep.spec.sections import ADDED_FIELDS, SweepSpec

# dotted prefixes of fields that do not change any trial's result
OPERATIONAL_FIELDS = (
    "name",  # the sweep id is fixed once the sweep exists
    "search.max_concurrent_trials",
    "search.max_failures",
    "resources.cpus_per_worker",
    "tracking",
    "storage",
    "base_model.cache_dir",
    "evaluation.cache_dir",
    "evaluation.weights_dir",
    "evaluation.jacobian.memory_budget_mb",  # chunking of the same computation
    "dataset.path",  # the same data mounted elsewhere on another cluster
)


@dataclass(frozen=True)
class SpecChange:
    field: str
    saved: Any
    given: Any

    @property
    def operational(self) -> bool:
        return any(self.field == f or self.field.startswith(f + ".") for f in OPERATIONAL_FIELDS)

    def __str__(self) -> str:
        return f"{self.field}: {self.saved!r} -> {self.given!r}"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def spec_changes(saved: dict, given: dict) -> list[SpecChange]:
    """Every leaf field whose value differs between two spec dicts (`SweepSpec.to_dict()` form)."""
    a, b = _flatten(saved), _flatten(given)
    return [SpecChange(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _as_it_ran(saved: dict) -> dict:
    """The saved spec with every field added since it was written (`ADDED_FIELDS`) set to the value
    its sweep ran with, not to today's default: resuming an old sweep does not change how its trials train."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (section, key), value in ADDED_FIELDS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out


def spec_for_resume(saved: dict, given: SweepSpec | None, *, allow_changes: bool, source: str) -> SweepSpec:
    """The spec to resume with: the saved one, plus the given spec's operational changes when allowed.

    Raises SpecError listing the differing fields when a result-changing field differs, or when an
    operational one does and `allow_changes` is off.
    """
    saved_spec = spec_from_dict(_as_it_ran(saved), source=f"{source} (saved spec)", check_paths=False)
    if given is None:
        return saved_spec
    changes = spec_changes(saved_spec.to_dict(), scrub_tree(given.to_dict()))  # the saved spec holds no credentials
    results = [c for c in changes if not c.operational]
    if results:
        raise SpecError(
            f"{source}: the spec differs from the one the sweep ran with in fields that change results:\n  "
            + "\n  ".join(map(str, results))
            + "\nfix: resume with the saved spec (`isosweep resume SWEEP_URI`, or undo these edits), or start a new sweep with `isosweep run`"
        )
    if changes and not allow_changes:
        raise SpecError(
            f"{source}: the spec differs from the one the sweep ran with in fields that do not change results:\n  "
            + "\n  ".join(map(str, changes))
            + "\nfix: pass --allow-changes to resume with these values, or undo them"
        )
    return given  # the saved spec's values, with the credentials it never stored
