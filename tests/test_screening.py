"""Multi-fidelity evaluation (evaluation.screening): the spec, the screening FID's interval, which trials are
evaluated in full, and how their rows change. The end-to-end sweep is in tests/test_sweep.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_metrics_evaluate import fast_domain  # noqa: F401 -- the fixture: a short recipe for the domain network

from isosweep.evaluation.metrics.confidence import fid_interval, fid_of_counts
from isosweep.evaluation.metrics.fid import feature_statistics, fid_from_features, frechet_distance
from isosweep.results.full_eval_records import apply_full_record
from isosweep.results.pareto import contenders, pareto_front
from isosweep.results.rows import make_row, summarize
from isosweep.results.tables import markdown_table
from isosweep.spec import SpecError, SweepSpec, load_spec


def _row(tid, fid, ppl, *, spread=1.0, baseline=False, fidelity="screen"):
    return {"trial_id": tid, "baseline": baseline, "status": "DONE", "fid": fid, "ppl": ppl, "fidelity": fidelity,
            "fid_lo": fid - spread, "fid_hi": fid + spread, "ppl_lo": ppl - spread, "ppl_hi": ppl + spread}


def test_a_trial_is_dropped_only_when_another_beats_it_beyond_the_noise_on_both_objectives():
    base = _row("base", 50, 50, baseline=True)
    good = _row("good", 10, 10)
    close = _row("close", 11.5, 30)  # FID inside good's noise: could still be on the front
    beaten = _row("beaten", 20, 20)  # good is below it beyond the noise on both
    worse_fid_better_ppl = _row("tradeoff", 40, 5)
    kept = {r["trial_id"] for r in contenders([base, good, close, beaten, worse_fid_better_ppl])}
    assert kept == {"base", "good", "close", "tradeoff"}


def test_the_baseline_is_always_evaluated_in_full_and_missing_objectives_never():
    base = _row("base", 90, 90, baseline=True)
    best = _row("best", 1, 1)
    broken = _row("broken", math.nan, 1)
    kept = contenders([base, best, broken])
    assert [r["trial_id"] for r in kept] == ["base", "best"]


def test_contenders_cover_the_front_whatever_the_full_numbers_inside_the_screening_intervals():
    """If every full value lies inside its screening interval, no dropped row reaches the full front."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = [_row(f"t{i}", *rng.uniform(0, 10, 2), spread=rng.uniform(0.1, 2), baseline=i == 0) for i in range(8)]
        kept = {r["trial_id"] for r in contenders(rows)}
        full = [{**r, "fid": rng.uniform(r["fid_lo"], r["fid_hi"]), "ppl": rng.uniform(r["ppl_lo"], r["ppl_hi"]),
                 "fid_lo": math.nan, "fid_hi": math.nan, "ppl_lo": math.nan, "ppl_hi": math.nan} for r in rows]
        assert {r["trial_id"] for r in pareto_front(full)} <= kept


def test_the_bootstrap_fid_of_all_ones_is_the_fid_and_its_interval_brackets_it():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 12)) * 1.3 + 0.2
    mu, sigma = feature_statistics(ref)
    feats = rng.normal(size=(200, 12))
    exact = fid_from_features(feats, mu, sigma)
    assert fid_of_counts(feats, mu, sigma)(np.ones((1, 200), int))[0] == pytest.approx(exact, rel=1e-9)
    counts = rng.multinomial(200, np.ones(200) / 200, size=3)
    for c, got in zip(counts, fid_of_counts(feats, mu, sigma)(counts)):
        drawn = np.repeat(feats, c, axis=0)
        assert got == pytest.approx(frechet_distance(*feature_statistics(drawn), mu, sigma), rel=1e-6)
    out = fid_interval(feats, mu, sigma, resamples=200, level=0.95, seed=3)
    assert out["fid_lo"] < exact < out["fid_hi"]  # re-centred: the resamples' upward bias is not in it
    few = feats[:20]  # fewer images than twice the dimension: the plain percentile interval lies wholly above FID
    from isosweep.evaluation.metrics.confidence import bootstrap_interval
    plain = bootstrap_interval(20, fid_of_counts(few, mu, sigma), resamples=200, level=0.95, seed=3, name="fid")
    small = fid_interval(few, mu, sigma, resamples=200, level=0.95, seed=3)
    assert plain[0] > fid_from_features(few, mu, sigma) and small["fid_lo"] < fid_from_features(few, mu, sigma) < small["fid_hi"]
    assert out == fid_interval(feats, mu, sigma, resamples=200, level=0.95, seed=3)  # seeded: reproducible


def _demo(**evaluation) -> SweepSpec:
    spec = load_spec("search_spaces/demo.yaml")
    data = spec.to_dict()
    data["evaluation"].update(evaluation)
    return SweepSpec.model_validate(data)


def test_screening_must_be_cheaper_than_the_full_protocol_and_is_checked_early():
    spec = _demo(screening={"fid": {"num_samples": 8, "ddim_steps": 2}, "ppl": {"num_samples": 4, "ddim_steps": 2}})
    screened = spec.evaluation.screened()
    assert (screened.fid.num_samples, screened.ppl.num_samples) == (8, 4)
    assert screened.fid.reference_samples == spec.evaluation.fid.reference_samples  # the rest as it is
    with pytest.raises(Exception, match=r"screening\.ppl\.num_samples = 100000 is more than evaluation\.ppl\.num_samples"):
        _demo(screening={"ppl": {"num_samples": 100000, "ddim_steps": 2}, "fid": {"num_samples": 8, "ddim_steps": 2}})
    with pytest.raises(Exception, match="bootstrap.resamples"):
        _demo(screening={"fid": {"num_samples": 8, "ddim_steps": 2}, "ppl": {"num_samples": 4, "ddim_steps": 2}},
              bootstrap={"resamples": 0, "level": 0.95})


def test_a_misspelt_screening_field_names_the_field(tmp_path):
    text = open("search_spaces/demo.yaml").read().replace("evaluation:\n", "evaluation:\n  screening: {fid: {num_sample: 8}}\n", 1)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"evaluation\.screening\.fid\.num_sample"):
        load_spec(str(path))


def test_screened_rows_are_never_selected_and_full_ones_keep_their_screening_numbers():
    spec = _demo()
    base = make_row("base", {"baseline": True, "lambda_iso": 0.0, "p": 1.0},
                    {"evaluated": True, "fid": 30.0, "ppl": 9.0, "fidelity": "screen", "fid_lo": 29.0, "fid_hi": 31.0}, "DONE")
    winner = make_row("win", {"lambda_iso": 1e-3, "p": 0.5}, {"evaluated": True, "fid": 1.0, "ppl": 1.0, "fidelity": "screen"}, "DONE")
    front, champion = summarize(spec, [base, winner])
    assert front == [] and champion is None  # nothing at full fidelity yet: nobody is crowned
    apply_full_record(base, {"metrics": {"fid": 40.0, "ppl": 8.0, "ppl_lo": 7.5, "ppl_hi": 8.5}, "timings": {"fid": 3.0}})
    assert (base["fid"], base["screen_fid"], base["screen_fid_lo"], base["fidelity"]) == (40.0, 30.0, 29.0, "full")
    assert math.isnan(base["fid_lo"]) and base["cost_full_fid_s"] == 3.0
    front, champion = summarize(spec, [base, winner])
    assert [r["trial_id"] for r in front] == ["base"] and champion.row is base
    table = markdown_table([base, winner])
    assert "fidelity" in table.splitlines()[0] and "| screen |" in table and "| full |" in table


def test_sequential_pairs_stops_after_the_first_round_that_is_enough_and_keeps_pair_order():
    from isosweep.evaluation.metrics.ppl import sequential_pairs

    values = np.arange(100, dtype=float)
    calls = []

    def compute(a, b):
        calls.append((a, b))
        return values[a:b]

    out = sequential_pairs(compute, lambda v: [v], num_samples=100, round_pairs=30, rank=0, world_size=1,
                           enough=lambda d: len(d) >= 55)
    assert out.tolist() == list(range(60)) and calls == [(0, 30), (30, 60)]
    never = sequential_pairs(compute, lambda v: [v], num_samples=100, round_pairs=30, rank=0, world_size=1, enough=lambda d: False)
    assert never.tolist() == list(range(100))
    # two ranks: each computes its contiguous half of every round; gathered in rank order, that is pair order
    seen = {0: [], 1: []}
    outs = []
    for rank in (0, 1):
        def compute_r(a, b, rank=rank):
            seen[rank].append((a, b))
            return values[a:b]

        def gather(mine, rank=rank):  # what all_gather hands this rank: both halves of the round, rank order
            a, b = seen[rank][-1]
            other = values[b:b + (b - a)] if rank == 0 else values[a - (b - a):a]
            return [mine, other] if rank == 0 else [other, mine]

        outs.append(sequential_pairs(compute_r, gather, num_samples=100, round_pairs=30, rank=rank, world_size=2,
                                     enough=lambda d: len(d) >= 55))
    assert outs[0].tolist() == outs[1].tolist() == list(range(60))
    assert seen[0] == [(0, 15), (30, 45)] and seen[1] == [(15, 30), (45, 60)]


@pytest.mark.usefixtures("one_thread")
def test_a_sequential_ppl_that_stops_early_is_the_ppl_of_its_first_pairs(tmp_path, fast_domain):
    from test_metrics_evaluate import tiny_eval_spec, tiny_unet

    from isosweep.evaluation.suite import evaluate_model
    from isosweep.models.builtin import default_scheduler
    from isosweep.spec import DatasetSpec

    unet, sched, data = tiny_unet(), default_scheduler(), DatasetSpec(kind="shapes", resolution=16, size=64)
    loose = tiny_eval_spec(tmp_path, metrics=["ppl"], ppl={"num_samples": 12, "ddim_steps": 2, "stop_width": 2.0, "round_pairs": 4})
    first4 = tiny_eval_spec(tmp_path, metrics=["ppl"], ppl={"num_samples": 4, "ddim_steps": 2})
    seq = evaluate_model(unet, sched, loose, data, progress=False, images=False)
    fixed = evaluate_model(unet, sched, first4, data, progress=False, images=False)
    assert seq.metrics["ppl_n"] == 4 and seq.metrics["ppl"] == fixed.metrics["ppl"]
    tight = tiny_eval_spec(tmp_path, metrics=["ppl"], ppl={"num_samples": 12, "ddim_steps": 2, "stop_width": 1e-9, "round_pairs": 4})
    assert evaluate_model(unet, sched, tight, data, progress=False, images=False).metrics["ppl_n"] == 12  # never tight: all pairs


def test_the_screening_check_counts_unet_evaluations_and_flags_a_dropped_front_member():
    """bench/screening.py: one UNet pass per FID image and step, two per PPL pair and step; a trial that screening
    drops but that is on the full front makes the sweep DIFFERENT, and is named."""
    from bench import screening as bench
    assert bench.unet_evaluations(512, 10, 192, 10) == 512 * 10 + 2 * 192 * 10
    spec = _demo()
    full = [{"trial_id": "base", "baseline": True, "status": "DONE", "fid": 50.0, "ppl": 50.0},
            {"trial_id": "a", "baseline": False, "status": "DONE", "fid": 10.0, "ppl": 10.0},
            {"trial_id": "b", "baseline": False, "status": "DONE", "fid": 12.0, "ppl": 5.0},
            {"trial_id": "err", "baseline": False, "status": "ERROR", "fid": 1.0, "ppl": 1.0}]

    def screen(v, spread=1.0):
        return {"fid": v, "fid_lo": v - spread, "fid_hi": v + spread, "ppl": v, "ppl_lo": v - spread, "ppl_hi": v + spread}

    wrong = bench.check(spec, full, {"base": screen(50), "a": screen(10), "b": screen(20)})  # b looks beaten, is not
    assert wrong.contenders == ["a", "base"] and wrong.missed == ["b"] and not wrong.same
    assert set(wrong.front_full) == {"a", "b"} and wrong.front_mf == ["a"] and wrong.trials == ["base", "a", "b"]
    assert (wrong.separated, wrong.order_kept) == (6, 5)  # a below b on PPL at screening, above it in full
    right = bench.check(spec, full, {"base": screen(50), "a": screen(10), "b": screen(11, spread=2.0)})
    assert right.same and right.missed == [] and right.champion_full == right.champion_mf == "b"
    assert full[1] == {"trial_id": "a", "baseline": False, "status": "DONE", "fid": 10.0, "ppl": 10.0}  # rows unchanged


def test_the_sequential_ppl_replay_stops_where_the_evaluation_would():
    """bench/sequential_ppl.py: on pairs whose values barely vary the interval is tight after the first round, on
    heavy-tailed pairs (shapes' PPL) never; what it keeps is always a prefix, in pair order."""
    import numpy as np

    from bench import sequential_ppl as mod
    rng = np.random.default_rng(0)
    steady = 50 + rng.normal(0, 0.5, 192)
    heavy = rng.pareto(0.8, 192) * 10
    kept = mod.stopped_pairs(steady, stop_width=0.1, round_pairs=32, level=0.95, seed=0)
    assert len(kept) == 32 and np.array_equal(kept, steady[:32])
    assert len(mod.stopped_pairs(heavy, stop_width=0.1, round_pairs=32, level=0.95, seed=0)) == 192
