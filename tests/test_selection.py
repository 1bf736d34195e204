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


def test_without_a_finite_baseline_no_champion_is_chosen_or_promoted():
    """A failed baseline must not let a collapsed model (FID 480, PPL 0.01) win on PPL alone."""
    import math

    from isosweep.results.states import COMPLETED, FAILED, INTERRUPTED, SweepState, promotion_refusal, sweep_state

    rows = [dict(row("base", math.nan, math.nan, baseline=True), status="ERROR"),
            dict(row("collapsed", 480.0, 0.01), status="DONE"), dict(row("ok", 21.0, 40.0), status="DONE")]
    assert choose_champion(rows, "fid_tolerance") is None
    state = sweep_state(rows, planned=3)
    assert state == SweepState(FAILED, [], ["base"], 0) and state.exit_code == 3
    assert "completed" in promotion_refusal(state, rows, None)
    done_but_nan = [dict(rows[0], status="DONE")] + rows[1:]
    knee = choose_champion(done_but_nan, "knee")  # knee and weighted ignore the baseline: the guard does not
    assert knee is not None
    assert "baseline" in promotion_refusal(sweep_state(done_but_nan, 3), done_but_nan, knee)
    good = [dict(row("base", 20.0, 50.0, baseline=True), status="DONE")] + rows[1:]
    champ = choose_champion(good, "fid_tolerance")
    assert champ.row["trial_id"] == "ok" and promotion_refusal(sweep_state(good, 3), good, champ) is None
    # stopped early: unfinished and not-yet-created trials make it INTERRUPTED, exit 130, nothing promoted
    partial = good[:2] + [dict(row("t3", math.nan, math.nan), status="INCOMPLETE")]
    state = sweep_state(partial, planned=4)
    assert (state.state, state.unfinished, state.not_started, state.exit_code) == (INTERRUPTED, ["t3"], 1, 130)
    assert "only a completed sweep" in promotion_refusal(state, partial, champ)
    assert sweep_state(good, 3, interrupted=True).state == INTERRUPTED
    assert sweep_state(good, 3).state == COMPLETED


def test_an_errored_trial_row_is_named_by_its_trial_id():
    """A trial that errored before reporting has no metrics: its row (and the sweep state's `errored`
    list) names it by the trial id in its Tune folder, not by the long folder name."""
    from isosweep.sweep.trial import _trial_id_of_folder

    assert _trial_id_of_folder("/s/isosweep_trial_719dc20c_1_baseline=True,lambda_iso=0.0000_2026-11-26_04-28-30") == "719dc20c"
    assert _trial_id_of_folder("s3://b/p/isosweep_trial_abcde_00003_3_lambda_iso=0.1_2026-11-26/") == "abcde_00003"
    assert _trial_id_of_folder("/s/not-a-trial-folder") == "not-a-trial-folder"
