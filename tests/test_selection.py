"""Pareto front and champion rules on hand-made rows with known answers."""

import math

import pytest

from isosweep.results.selection import choose_champion, pareto_front


def row(tid, fid, ppl, baseline=False):
    return {"trial_id": tid, "fid": fid, "ppl": ppl, "baseline": baseline}


ROWS = [
    row("base", 10.0, 100.0, baseline=True),
    row("a", 10.5, 80.0),   # front, within 10% of the baseline FID
    row("b", 12.0, 60.0),   # front, FID too high for the 10% rule
    row("c", 11.0, 90.0),   # dominated by a
    row("d", 9.5, 120.0),   # front: best FID
    row("e", math.nan, 10.0),  # not evaluated: never on the front
]


def test_pareto_front():
    front = pareto_front(ROWS)
    assert [r["trial_id"] for r in front] == ["d", "base", "a", "b"]


def test_fid_tolerance_rule():
    choice = choose_champion(ROWS, "fid_tolerance", fid_tolerance=0.10)
    assert choice.row["trial_id"] == "a"
    assert "11" in choice.reason
    assert choose_champion(ROWS, "fid_tolerance", fid_tolerance=0.25).row["trial_id"] == "b"
    # nothing beats the baseline inside a zero tolerance except a lower-FID trial with higher PPL
    assert choose_champion(ROWS, "fid_tolerance", fid_tolerance=0.0).row["trial_id"] == "base"


def test_knee_and_weighted():
    assert choose_champion(ROWS, "knee").row["trial_id"] == "a"
    assert choose_champion(ROWS, "weighted", weights={"fid": 0.0, "ppl": 1.0}).row["trial_id"] == "b"
    assert choose_champion(ROWS, "weighted", weights={"fid": 1.0, "ppl": 0.0}).row["trial_id"] == "d"


def test_no_finite_rows():
    assert choose_champion([row("x", math.nan, 1.0)]) is None
    with pytest.raises(ValueError):
        choose_champion(ROWS, "best")
