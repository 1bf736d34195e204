"""Multi-objective selection: the Pareto front over two minimised objectives and the champion rule.

Pure functions over result rows (dicts with at least the objective keys and `baseline`), so the
sweep, `isosweep results` and the tests share one implementation.

A trial is never "better" inside the noise. Where a row carries a bootstrap interval of an objective
(`<objective>_lo`, `<objective>_hi`: PPL, mRTL, MCN, VoR; docs/metrics.md) one row beats another on it only
when its interval lies wholly below the other's (`lower_beyond_noise`): its upper end below the other's lower
end. A value without an interval (FID; rows of sweeps from before the intervals) stands for its own interval,
so such rows compare by their values, exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Row = dict


def _finite(row: Row, keys: Sequence[str]) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in keys)


def interval(row: Row, key: str) -> tuple[float, float]:
    """(lo, hi) of a row's `key`: its bootstrap interval `<key>_lo`, `<key>_hi` when both are finite, else
    (value, value): a number without an interval (FID, an older sweep's PPL) stands for itself."""
    if _finite(row, (f"{key}_lo", f"{key}_hi")):
        return float(row[f"{key}_lo"]), float(row[f"{key}_hi"])
    return float(row[key]), float(row[key])


def has_interval(row: Row, key: str) -> bool:
    return _finite(row, (f"{key}_lo", f"{key}_hi"))


def lower_beyond_noise(a: Row, b: Row, key: str) -> bool:
    """a's `key` is lower than b's beyond the noise: a's interval lies wholly below b's (a_hi < b_lo). Without
    intervals on either row that is a[key] < b[key]."""
    return interval(a, key)[1] < interval(b, key)[0]


def pareto_front(rows: Sequence[Row], objectives: Sequence[str] = ("fid", "ppl")) -> list[Row]:
    """Rows not dominated by any other (all objectives minimised), sorted by the first objective.

    A row dominates another when it is no worse in every objective (its value is at most the other's) and
    better beyond the noise in one (`lower_beyond_noise`: its interval wholly below the other's where intervals
    exist, a lower value where they do not). Rows with a missing or non-finite objective are never on the front.
    """
    valid = [r for r in rows if _finite(r, objectives)]
    front = []
    for r in valid:
        dominated = any(
            all(o[k] <= r[k] for k in objectives) and any(lower_beyond_noise(o, r, k) for k in objectives)
            for o in valid
            if o is not r
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: tuple(r[k] for k in objectives))


def contenders(rows: Sequence[Row], objectives: Sequence[str] = ("fid", "ppl")) -> list[Row]:
    """The screened rows that can still reach the Pareto front or the champion rule, and the baseline (its reference).

    A row is out only when another beats it beyond the noise on every objective (`lower_beyond_noise` on each: the
    other's interval wholly below its own), which at full fidelity would dominate it and, having the lower PPL with
    a FID no higher, be preferred by every rule. Rows with a missing objective are out; the baseline never is.
    """
    valid = [r for r in rows if _finite(r, objectives)]
    keep = [r for r in valid if r.get("baseline")
            or not any(o is not r and all(lower_beyond_noise(o, r, k) for k in objectives) for o in valid)]
    return sorted(keep, key=lambda r: (not r.get("baseline"), tuple(r[k] for k in objectives)))


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

    - `fid_tolerance` (default): among trials whose first objective (FID) is at most baseline * (1 +
      fid_tolerance) and whose second (PPL) is below the baseline's beyond the noise (`lower_beyond_noise`:
      with intervals, the trial's PPL upper end below the baseline's lower end; without, a lower PPL), the
      lowest PPL; the baseline itself when no trial qualifies; nothing without a finite baseline.
    - `knee`: on objectives min-max normalised over the front, the row closest to the utopia point.
    - `weighted`: the lowest weighted sum of min-max normalised objectives.
    knee and weighted compare values, but only among rows of the front, which no row beats beyond the noise.
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
        better = [r for r in rows if r is not base and _finite(r, objectives) and r[a] <= limit and lower_beyond_noise(r, base, b)]
        noise = (f" and {b} interval wholly below the baseline's (upper end < {interval(base, b)[0]:.4g})"
                 if has_interval(base, b) or any(has_interval(r, b) for r in rows) else f" and {b} below the baseline's")
        if not better:
            return Choice(base, f"the baseline: no trial has {a} <= baseline {a} x {1 + fid_tolerance:g} = {limit:.4g}{noise}")
        best = min(better, key=lambda r: (r[b], r[a]))
        return Choice(best, f"lowest {b} among trials with {a} <= baseline {a} x {1 + fid_tolerance:g} = {limit:.4g}{noise}")
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
