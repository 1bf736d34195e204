"""A sweep's state, what it left unfinished, whether its champion may be promoted, and its exit code.

    RUNNING       recorded when the sweep starts or resumes
    INTERRUPTED   stopped before every planned trial ended (Ctrl-C, a stopped job): resumable
    FAILED        every trial ended but some errored: resumable (errored trials run again)
    COMPLETED     every planned trial finished and was evaluated

Only a COMPLETED sweep whose baseline finished with finite objectives may move the registry's
`@champion` alias; anything else says why it promoted nothing (a partial sweep, or one whose
baseline failed, must never crown a model nobody compared against the baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from isosweep.constants import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED
from isosweep.results.pareto import Choice

RUNNING, INTERRUPTED, FAILED, COMPLETED = "RUNNING", "INTERRUPTED", "FAILED", "COMPLETED"



@dataclass(frozen=True)
class SweepState:
    """Where a sweep stands after its Tune run returned."""

    state: str
    unfinished: list[str] = field(default_factory=list)  # trial ids started but not evaluated
    errored: list[str] = field(default_factory=list)
    not_started: int = 0  # planned trials the search had not created yet

    @property
    def exit_code(self) -> int:
        return {INTERRUPTED: EXIT_INTERRUPTED, FAILED: EXIT_FAILED}.get(self.state, EXIT_COMPLETED)

    def describe(self) -> str:
        parts = []
        if self.unfinished:
            parts.append(f"{len(self.unfinished)} unfinished ({', '.join(self.unfinished)})")
        if self.not_started:
            parts.append(f"{self.not_started} not started")
        if self.errored:
            parts.append(f"{len(self.errored)} errored ({', '.join(self.errored)})")
        return self.state + (": " + "; ".join(parts) if parts else "")


def sweep_state(rows: Sequence[dict], planned: int, interrupted: bool = False) -> SweepState:
    """The state from the rows (status DONE, ERROR or anything else = unfinished) and the planned count.

    `interrupted`: the run was stopped (a signal, a stopped job) even if every row happens to have ended.
    """
    unfinished = [r["trial_id"] for r in rows if r["status"] not in ("DONE", "ERROR")]
    errored = [r["trial_id"] for r in rows if r["status"] == "ERROR"]
    not_started = max(0, planned - len(rows))
    if interrupted or unfinished or not_started:
        return SweepState(INTERRUPTED, unfinished, errored, not_started)
    if errored:
        return SweepState(FAILED, [], errored, 0)
    return SweepState(COMPLETED)


def promotion_refusal(state: SweepState, rows: Sequence[dict], champion: Choice | None,
                      objectives: Sequence[str] = ("fid", "ppl")) -> str | None:
    """Why the champion must not be promoted, or None when it may be."""
    if state.state != COMPLETED:
        return f"the sweep is {state.describe()}; only a completed sweep moves @champion"
    base = [r for r in rows if r.get("baseline")]
    if not base or base[0]["status"] != "DONE" or not all(_finite(base[0].get(k)) for k in objectives):
        return "the baseline (lambda_iso = 0) did not finish with finite " + " and ".join(objectives) + \
            ", so no trial can be compared against it"
    if champion is None:
        return "no trial finished with finite objectives"
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
