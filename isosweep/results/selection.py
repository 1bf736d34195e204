"""Multi-objective selection: the Pareto front over two minimised objectives and the champion rule.

Pure functions over result rows (dicts with at least the objective keys and `baseline`), so the
sweep, `isosweep results` and the tests share one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Row = dict


def _finite(row: Row, keys: Sequence[str]) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in keys)


def pareto_front(rows: Sequence[Row], objectives: Sequence[str] = ("fid", "ppl")) -> list[Row]:
    """Rows not dominated by any other (all objectives minimised), sorted by the first objective.

    A row dominates another when it is no worse in every objective and strictly better in one.
    Rows with a missing or non-finite objective are never on the front.
    """
    valid = [r for r in rows if _finite(r, objectives)]
    front = []
    for r in valid:
        dominated = any(
            all(o[k] <= r[k] for k in objectives) and any(o[k] < r[k] for k in objectives)
            for o in valid
            if o is not r
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: tuple(r[k] for k in objectives))


@dataclass(frozen=True)
class Choice:
    """The champion and why it was chosen (the sentence goes into the report)."""

    row: Row
    reason: str


def _baseline(rows: Sequence[Row]) -> Row | None:
    base = [r for r in rows if r.get("baseline")]
    return base[0] if base else None


def choose_champion(
    rows: Sequence[Row],
    rule: str = "fid_tolerance",
    objectives: Sequence[str] = ("fid", "ppl"),
    fid_tolerance: float = 0.10,
    weights: dict[str, float] | None = None,
) -> Choice | None:
    """Pick the champion from the Pareto front by a stated rule.

    - `fid_tolerance` (default): the lowest second objective (PPL) among front rows whose first
      objective (FID) is at most baseline * (1 + fid_tolerance); falls back to the baseline itself
      when no isometric trial qualifies, and chooses nothing without a finite baseline.
    - `knee`: on objectives min-max normalised over the front, the row closest to the utopia point.
    - `weighted`: the lowest weighted sum of min-max normalised objectives.
    Returns None when no row has finite objectives.
    """
    front = pareto_front(rows, objectives)
    if not front:
        return None
    a, b = objectives
    if rule == "fid_tolerance":
        base = _baseline(rows)
        if base is None or not _finite(base, objectives):
            return None  # the rule is relative to the baseline: without one, a collapsed model could win on b alone
        limit = base[a] * (1.0 + fid_tolerance)
        ok = [r for r in rows if _finite(r, objectives) and r[a] <= limit]
        best = min(ok, key=lambda r: (r[b], r[a]))
        return Choice(
            best,
            f"lowest {b} among trials with {a} <= baseline {a} x {1 + fid_tolerance:g} = {limit:.4g}",
        )
    lo = {k: min(r[k] for r in front) for k in objectives}
    hi = {k: max(r[k] for r in front) for k in objectives}

    def norm(r: Row, k: str) -> float:
        span = hi[k] - lo[k]
        return 0.0 if span == 0 else (r[k] - lo[k]) / span

    if rule == "knee":
        best = min(front, key=lambda r: math.hypot(norm(r, a), norm(r, b)))
        return Choice(best, f"knee point: closest to the utopia point of min-max normalised ({a}, {b}) on the front")
    if rule == "weighted":
        w = weights or {a: 1.0, b: 1.0}
        best = min(front, key=lambda r: w.get(a, 1.0) * norm(r, a) + w.get(b, 1.0) * norm(r, b))
        return Choice(best, f"lowest weighted sum {w.get(a, 1.0):g}*{a} + {w.get(b, 1.0):g}*{b} of min-max normalised objectives on the front")
    raise ValueError(f"unknown selection rule {rule!r}; use fid_tolerance, knee or weighted")
