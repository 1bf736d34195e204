"""Pareto front and champion rules on hand-made rows with known answers."""

import math

import pytest

from isosweep.results.pareto import choose_champion, pareto_front


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


def test_a_trial_is_not_better_than_the_baseline_inside_the_noise():
    """With PPL intervals (docs/metrics.md, "Intervals"): a trial whose PPL interval overlaps the baseline's is
    refused however low its point value; one whose interval lies wholly below the baseline's wins."""
    base = dict(row("base", 10.0, 100.0, baseline=True), ppl_lo=90.0, ppl_hi=110.0)
    overlapping = dict(row("lucky", 10.2, 70.0), ppl_lo=50.0, ppl_hi=95.0)  # lowest PPL, but 95 > 90: inside the noise
    separated = dict(row("sure", 10.4, 80.0), ppl_lo=75.0, ppl_hi=85.0)
    choice = choose_champion([base, overlapping, separated], "fid_tolerance", fid_tolerance=0.10)
    assert choice.row["trial_id"] == "sure" and "interval" in choice.reason and "90" in choice.reason
    assert [r["trial_id"] for r in pareto_front([base, overlapping, separated])] == ["base", "lucky"]  # off the front
    alone = choose_champion([base, overlapping], "fid_tolerance", fid_tolerance=0.10)
    assert alone.row["trial_id"] == "base" and alone.reason.startswith("the baseline")
    # a row of an older sweep has no interval: its value stands for itself against the baseline's interval
    old = row("old", 10.1, 89.0)
    assert choose_champion([base, old], "fid_tolerance", fid_tolerance=0.10).row["trial_id"] == "old"
    assert choose_champion([base, dict(old, ppl=91.0)], "fid_tolerance", fid_tolerance=0.10).row["trial_id"] == "base"


def test_the_front_keeps_rows_that_are_only_worse_inside_the_noise():
    a = dict(row("a", 10.0, 80.0), ppl_lo=70.0, ppl_hi=90.0)
    b = dict(row("b", 10.0, 85.0), ppl_lo=75.0, ppl_hi=95.0)   # same FID, PPL worse only inside the noise: kept
    c = dict(row("c", 10.0, 120.0), ppl_lo=110.0, ppl_hi=130.0)  # worse beyond the noise: dominated by a
    assert [r["trial_id"] for r in pareto_front([a, b, c])] == ["a", "b"]
    # without the intervals the same values select as before: b is dominated
    plain = [{k: v for k, v in r.items() if not k.endswith(("_lo", "_hi"))} for r in (a, b, c)]
    assert [r["trial_id"] for r in pareto_front(plain)] == ["a"]


def test_rows_of_an_older_sweep_load_and_select_as_before():
    """Tune results written before the intervals: no ppl_lo/ppl_hi, quantiles or per-timestep values."""
    from isosweep.results.rows import make_row

    old = [make_row(tid, {"baseline": base, "lambda_iso": 0.0 if base else 1e-3, "p": 0.5, "iso_metric": "stereographic"},
                    {"fid": fid, "ppl": ppl, "mrtl": 2.0, "evaluated": True}, "TERMINATED")
           for tid, fid, ppl, base in [("base", 10.0, 100.0, True), ("a", 10.5, 80.0, False), ("b", 12.0, 60.0, False),
                                       ("c", 11.0, 90.0, False), ("d", 9.5, 120.0, False)]]
    assert all(math.isnan(r["ppl_lo"]) and math.isnan(r["ppl_median"]) for r in old)
    assert [r["trial_id"] for r in pareto_front(old)] == ["d", "base", "a", "b"]
    assert choose_champion(old, "fid_tolerance", fid_tolerance=0.10).row["trial_id"] == "a"
    assert choose_champion(old, "fid_tolerance", fid_tolerance=0.25).row["trial_id"] == "b"
    assert choose_champion(old, "fid_tolerance", fid_tolerance=0.0).row["trial_id"] == "base"


def test_tables_show_intervals_where_the_metric_is_read():
    from isosweep.results.rows import make_row
    from isosweep.results.tables import markdown_table, plain_table

    metrics = {"fid": 10.0, "ppl": 80.0, "ppl_lo": 75.0, "ppl_hi": 85.5, "mcn": 12.0, "vor": 0.5, "vor_lo": 0.25,
               "vor_hi": 0.75, "vor_t100": 0.9, "vor_t100_lo": 0.8, "vor_t100_hi": 1.0, "evaluated": True,
               "backbone_fid": "domain-shapes-v1", "backbone_ppl": "domain-shapes-v1", "backbone_vor": "norm-global_mean"}
    r = make_row("t1", {"lambda_iso": 1e-3, "p": 0.5, "iso_metric": "ambient"}, metrics, "TERMINATED")
    assert r["vor_t100_hi"] == 1.0 and math.isnan(r["mrtl_lo"])  # further timesteps travel with the row
    md = markdown_table([r], {"fid": "domain-shapes-v1", "ppl": "domain-shapes-v1", "vor": "norm-global_mean"})
    assert "| 80 [75, 85.5] |" in md and "| 0.5 [0.25, 0.75] |" in md and "| 12 |" in md
    assert "vor [norm-global_mean]" in md and "ppl [domain-shapes-v1]" in md
    assert "80 [75, 85.5]" in plain_table([r])
    old = make_row("t0", {}, {"fid": 10.0, "ppl": 80.0, "vor": 0.5, "evaluated": True, "backbone_vor": "none"}, "TERMINATED")
    md_old = markdown_table([old], {"fid": "x", "ppl": "x", "vor": "none"})
    assert "| 80 |" in md_old and "| vor |" in md_old  # an older sweep: values alone, VoR unnamed


def _measured(seed: int, spread: float, ppl_scale: float, fid: float) -> dict:
    """Metrics as the evaluation suite computes them from per-unit values: MCN and VoR (at t = 999 and 100) from
    Jacobian singular values, mRTL from per-pair values, PPL from per-pair distances, each with its bootstrap interval."""
    import numpy as np
    import torch

    from isosweep.evaluation.metrics.confidence import mean_interval, ppl_summary, vor_interval
    from isosweep.evaluation.metrics.jacobian import condition_numbers, mcn, vor

    rng = np.random.default_rng(seed)
    boot = {"resamples": 200, "level": 0.95, "seed": 0}
    m = {"fid": fid, "evaluated": True, "backbone_fid": "domain-shapes-v1", "backbone_ppl": "domain-shapes-v1"}
    for name in ("", "_t100"):
        svals = -np.sort(-rng.lognormal(0.0, spread, (48, 6)), axis=1)  # largest first, as the suite gathers them
        m[f"mcn{name}"], m[f"vor{name}"] = mcn(torch.from_numpy(svals)), vor(torch.from_numpy(svals))
        m.update(mean_interval(f"mcn{name}", condition_numbers(torch.from_numpy(svals)).numpy(), **boot))
        m.update(vor_interval(f"vor{name}", svals, "global_mean", **boot))
    pairs = rng.lognormal(0.5, 0.2, 12)
    m["mrtl"] = float(pairs.mean())
    m.update(mean_interval("mrtl", pairs, **boot))
    m.update(ppl_summary(rng.lognormal(np.log(ppl_scale), 1.0, 48), **boot))
    return m


def test_the_summary_report_and_table_say_what_the_loss_changed_beyond_the_noise_or_inside_it(tmp_path, capsys):
    """The demo's case: no trial's PPL lies below the baseline's beyond the noise, so the baseline stays champion,
    yet the summary, the report and results.md show each trial's MCN, VoR, mRTL and PPL with intervals next to the
    baseline's and say where the loss moved them beyond the noise (the intervals do not overlap)."""
    from isosweep.commands.sweep import print_summary
    from isosweep.evaluation.record import metric_text
    from isosweep.results.report import write_report
    from isosweep.results.rows import SweepOutcome, make_row, summarize
    from isosweep.results.tables import save_tables
    from isosweep.spec import load_spec

    spec = load_spec("search_spaces/demo.yaml")
    base_cfg = {"baseline": True, "lambda_iso": 0.0, "p": 1.0, "iso_metric": "stereographic"}
    rows = [make_row("base0001", base_cfg, _measured(0, 0.3, 100.0, 10.0), "TERMINATED"),
            make_row("iso00002", {"lambda_iso": 0.2, "p": 0.5, "iso_metric": "stereographic"},
                     _measured(1, 0.05, 90.0, 10.5), "TERMINATED"),  # nearly isometric: MCN, VoR far below
            make_row("same0003", {"lambda_iso": 1e-3, "p": 0.5, "iso_metric": "identity"},
                     _measured(3, 0.3, 95.0, 10.2), "TERMINATED"),  # the baseline's distribution: inside the noise
            make_row("worse004", {"lambda_iso": 0.9, "p": 0.0, "iso_metric": "identity"},
                     _measured(4, 0.9, 110.0, 11.0), "TERMINATED")]  # spread out: MCN, VoR far above
    front, champion = summarize(spec, rows)
    base, iso, same, worse = rows
    assert champion.row is base  # no PPL interval below the baseline's
    outcome = SweepOutcome("demo-x", tmp_path, rows, front, champion)

    print_summary(spec, outcome)
    out = capsys.readouterr().out
    assert "what the loss changed against the baseline (95% bootstrap intervals; lower/higher: beyond the noise" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["mcn"], ["vor"], ["vor_t100"], ["ppl"])}
    assert set(lines) == {"mcn", "vor", "vor_t100", "ppl"}
    for k in ("mcn", "vor", "vor_t100"):
        assert metric_text(base, k) in lines[k] and f"{metric_text(iso, k)} lower" in lines[k], lines[k]
        assert f"{metric_text(same, k)} overlap" in lines[k] and f"{metric_text(worse, k)} higher" in lines[k], lines[k]
    assert "lower" not in lines["ppl"] and f"{metric_text(iso, 'ppl')} overlap" in lines["ppl"]
    assert out.index("champion: trial base0001") < out.index("what the loss changed") < out.index("sweep:")

    report = write_report(spec, outcome, tmp_path / "report") / "report.md"
    text = report.read_text()
    assert "## What the loss changed" in text
    assert "| metric | baseline base0001 | same0003 (lambda_iso=0.001) | iso00002 (lambda_iso=0.2) | worse004 (lambda_iso=0.9) |" in text
    assert (f"| vor | {metric_text(base, 'vor')} | {metric_text(same, 'vor')} overlap | {metric_text(iso, 'vor')} lower "
            f"| {metric_text(worse, 'vor')} higher |") in text  # trials in table order: by FID
    _, md = save_tables(rows, tmp_path, spec.evaluation.bootstrap.level)
    assert f"| mcn | {metric_text(base, 'mcn')} | {metric_text(same, 'mcn')} overlap | {metric_text(iso, 'mcn')} lower |" in md.read_text()
