"""The search space per algorithm: the baseline always comes first, searched trials never are baseline."""

from pathlib import Path

import pytest

from isosweep.spec import BASELINE_PARAMS, load_spec
from isosweep.sweep.search import build_search

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _suggestions(alg, space, num_samples, n):
    alg.set_search_properties(None, None, space)
    out = []
    for i in range(n):
        s = alg.suggest(f"t{i}")
        if isinstance(s, dict):
            out.append(s)
    return out


def test_optuna_baseline_first_then_searched(tmp_path):
    spec = load_spec(DEMO, ["search.num_trials=4"])
    space, alg, num_samples = build_search(spec, "demo-1")
    assert num_samples == 5
    got = _suggestions(alg, space, num_samples, 3)
    assert got[0] == BASELINE_PARAMS
    for s in got[1:]:
        assert s["baseline"] is False
        assert 1e-3 <= s["lambda_iso"] <= 1.0 and s["p"] in (0.0, 0.5) and s["iso_metric"] in ("stereographic", "identity")
    # two searched trials finish; the searcher's state then survives a save/restore (Tune checkpoints it
    # into the sweep's storage; a resume on another machine restores it into a fresh searcher)
    for i, tid in enumerate(("t1", "t2")):
        alg.on_trial_complete(tid, {"fid": 10.0 + i, "ppl": 5.0 - i, "lambda_iso": got[1 + i]["lambda_iso"]})
    # the baseline's result is no trial of the study (TPE never sees lambda_iso = 0), only its user attribute
    alg.on_trial_complete("t0", {"fid": 9.0, "ppl": float("nan"), "lambda_iso": 0.0})
    alg.save(str(tmp_path / "searcher.pkl"))
    _, fresh, _ = build_search(spec, "demo-1")
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert fresh.baseline_trial == "t0"
    history = fresh.inner._ot_study.get_trials(deepcopy=False)
    done = [t for t in history if t.state.name == "COMPLETE"]
    assert sorted(tuple(t.values) for t in done) == [(10.0, 5.0), (11.0, 4.0)]
    assert {t.params["lambda_iso"] for t in done} == {got[1]["lambda_iso"], got[2]["lambda_iso"]}
    # the journal beside the searcher state opens in Optuna (and optuna-dashboard) with the same history
    import optuna

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))
    loaded = optuna.load_study(study_name="demo-1", storage=journal)
    assert sorted(tuple(t.values) for t in loaded.trials if t.values) == [(10.0, 5.0), (11.0, 4.0)]
    # named objectives, and the baseline beside the searched trials (NaN stored as null: the journal is JSON)
    assert loaded.metric_names == ["fid", "ppl"] == fresh.inner._ot_study.metric_names
    baseline = {k: v for k, v in BASELINE_PARAMS.items() if k != "baseline"}
    assert loaded.user_attrs["baseline"] == {"trial_id": "t0", "state": "COMPLETE", **baseline, "fid": 9.0, "ppl": None}
    assert len(loaded.trials) == 2


@pytest.mark.parametrize("algorithm", ["random", "grid"])
def test_basic_variant_algorithms_put_the_baseline_first(algorithm, tmp_path):
    overrides = [f"search.algorithm={algorithm}", "search.num_trials=3"]
    if algorithm == "grid":
        overrides += ["search.lambda_iso={type: choice, values: [0.01, 0.1]}"]
    spec = load_spec(DEMO, overrides)
    space, alg, num_samples = build_search(spec, "demo-1", max_concurrent=2)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    assert isinstance(alg, BasicVariantGenerator)
    assert alg._points_to_evaluate == [BASELINE_PARAMS]
    if algorithm == "grid":
        assert space["lambda_iso"] == {"grid_search": [0.01, 0.1]}
    assert space["baseline"] is False
    # drive the generator as Tune does: the baseline first, then every trial the spec asks for
    from ray.tune.experiment import Experiment

    alg.add_configurations([Experiment("t", run=lambda config: None, config=space, num_samples=num_samples,
                                       storage_path=str(tmp_path / "tune"))])
    first = [alg.next_trial() for _ in range(3)]
    assert first[2] is None  # max_concurrent: a third trial waits until one of two finishes
    configs = [t.config for t in first[:2]]
    for t in first[:2]:
        alg.on_trial_complete(t.trial_id)
    while (trial := alg.next_trial()) is not None:
        configs.append(trial.config)
        alg.on_trial_complete(trial.trial_id)
    assert configs[0]["baseline"] is True and all(c["baseline"] is False for c in configs[1:])
    from isosweep.sweep.search import planned_trials

    assert len(configs) == planned_trials(spec)
    if algorithm == "grid":  # 3 passes over lambda {0.01, 0.1} x p {0, 0.5} x G {stereographic, identity}
        combos = [(c["lambda_iso"], c["p"], c["iso_metric"]) for c in configs[1:]]
        assert len(combos) == 3 * 8 and len(set(combos)) == 8
    else:
        assert len(configs) == 4


def test_sweep_eta_from_finished_trials():
    from isosweep.sweep.callbacks import sweep_eta

    assert sweep_eta([], [0.0], remaining=3, concurrency=2, now=10.0) is None  # nothing finished yet
    # two finished trials of 100 s and 120 s (mean 110); one running for 60 s; 4 left = 1 running + 3 queued
    eta = sweep_eta([100.0, 120.0], [40.0], remaining=4, concurrency=2, now=100.0)
    assert eta == (110 - 60) + 2 * 110  # the running one's 50 s, then 3 queued in 2 waves
    assert sweep_eta([100.0], [], remaining=0, concurrency=2, now=0.0) == 0.0


def test_training_eta():
    from isosweep.sweep.train_worker import training_eta

    assert training_eta((5, 100.0), (15, 120.0), 40) == "0:50"  # 2 s a step, 25 steps left
    assert training_eta((5, 100.0), (5, 100.0), 40) == ""  # no pace yet
    assert training_eta((5, 100.0), (40, 170.0), 40) == ""  # done
    assert training_eta((5, 100.0), (15, 120.0), None) == ""  # epochs mode: total unknown


def test_a_trial_without_its_evaluation_fails_instead_of_counting_as_done(tmp_path):
    """A final checkpoint with no record, or a record without an objective, is a failed trial, not a DONE row."""
    from isosweep.evaluation.record import EvalResult
    from isosweep.results.rows import make_row
    from isosweep.sweep.trial import MissingEvaluation, evaluated_record, final_report

    spec = load_spec(DEMO, check_paths=False)
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    with pytest.raises(MissingEvaluation, match="no evaluation record"):
        evaluated_record(spec, ckpt, "t1")
    EvalResult(metrics={"fid": 12.0, "mrtl": 1.2}).write(ckpt)  # PPL missing (e.g. NaN, dropped by the record)
    with pytest.raises(MissingEvaluation, match="no finite ppl"):
        evaluated_record(spec, ckpt, "t1")
    EvalResult(metrics={"fid": 12.0, "ppl": 30.0}, backbones={"fid": "domain-shapes-v1"}).write(ckpt)
    record = evaluated_record(spec, ckpt, "t1")
    report = final_report(spec, {"step": 3, "loss": 0.1}, record, {"lambda_iso": 1e-3, "p": 0.5, "iso_metric": "identity",
                                                                  "baseline": False}, str(ckpt), "run1")
    row = make_row("t1", report, report, "TERMINATED")
    assert row["status"] == "DONE" and row["fid"] == 12.0 and row["iso_metric"] == "identity"
    assert row["backbone_fid"] == "domain-shapes-v1" and row["checkpoint_path"] == str(ckpt)


def test_objectives_must_be_measured():
    """A spec whose selection objectives are not evaluated is refused at load time, before any trial trains."""
    from isosweep.spec import SpecError

    with pytest.raises(SpecError, match=r"selection.objectives \['ppl'\] are not in evaluation.metrics"):
        load_spec(DEMO, ["evaluation.metrics=[fid, mrtl]"], check_paths=False)


def test_resume_from_an_unreadable_state_file_is_refused(tmp_path):
    """A truncated state file must stop `resume` with the file's name, not silently start a fresh sweep."""
    from isosweep.results.layout import STATE_FILE
    from isosweep.spec import SpecError
    from isosweep.results.place import SweepPlace

    spec = load_spec(DEMO, check_paths=False)
    sweep_dir = tmp_path / "demo-20261125-000000"
    sweep_dir.mkdir()
    (sweep_dir / STATE_FILE).write_text('{"sweep_id": "demo-2026')  # truncated mid-write
    with pytest.raises(SpecError, match=f"{STATE_FILE}: unreadable"):
        SweepPlace.open(spec, str(tmp_path), str(sweep_dir))
    (sweep_dir / STATE_FILE).write_text('{"sweep_id": "demo-20261125-000000"}')
    place = SweepPlace.open(spec, None, str(sweep_dir))
    assert place.sweep_id == "demo-20261125-000000" and place.resuming
    assert place.sweep_uri == str(sweep_dir) and place.storage == str(tmp_path)


POINTS = ("search.points=[{lambda_iso: 1.0e-3, p: 0.5, iso_metric: stereographic, seed: 1},"
          " {lambda_iso: 1.0e-3, p: 0.5, iso_metric: stereographic, iso_timesteps: pooled, seed: 1},"
          " {lambda_iso: 0.0, p: 1.0, iso_metric: stereographic, seed: 2}]")


def test_points_run_exactly_the_listed_trials_after_the_baseline_with_their_own_seed_and_timesteps(tmp_path):
    from ray.tune.experiment import Experiment

    from isosweep.results.rows import make_row
    from isosweep.results.tables import markdown_table
    from isosweep.spec import resolve_trial_spec, trial_params_of
    from isosweep.sweep.search import planned_trials

    spec = load_spec(DEMO, ["search.algorithm=points", POINTS, "train.seed=7", "train.iso_timesteps=per_timestep"])
    space, alg, num_samples = build_search(spec, "demo-1", max_concurrent=2)
    assert num_samples == planned_trials(spec) == 4
    alg.add_configurations([Experiment("t", run=lambda config: None, config=space, num_samples=num_samples,
                                       storage_path=str(tmp_path / "tune"))])
    configs = []
    while (trial := alg.next_trial()) is not None:
        configs.append(trial.config)
        alg.on_trial_complete(trial.trial_id)
    assert len(configs) == 4 and configs[0]["baseline"] is True and not any(c["baseline"] for c in configs[1:])
    trains = [resolve_trial_spec(spec, trial_params_of(c)).train for c in configs]
    # what each trial trains with: the point's seed and timestep handling, else train's (7, per_timestep)
    assert [(t.lambda_iso, t.seed, t.iso_timesteps) for t in trains] == [
        (0.0, 7, "per_timestep"), (1e-3, 1, "per_timestep"), (1e-3, 1, "pooled"), (0.0, 2, "per_timestep")]
    rows = [make_row(f"t{i}", c, {"evaluated": True, "fid": 1.0}, "TERMINATED") for i, c in enumerate(configs)]
    assert [r.get("seed") for r in rows] == [7, 1, 1, 2] and rows[2]["iso_timesteps"] == "pooled"
    assert {k for k, v in space.items() if hasattr(v, "categories")} == {"lambda_iso", "p", "iso_metric", "iso_timesteps", "seed"}
    assert "| iso_metric | iso_timesteps | seed |" in markdown_table(rows)


@pytest.mark.parametrize("overrides, message", [
    (["search.algorithm=points"], "search.points is empty"),
    ([POINTS], "but search.algorithm is optuna"),
    (["search.algorithm=points", "search.points=[{lambda_iso: 0.1, p: 0.5, iso_metric: identity},"
      " {lambda_iso: 0.1, p: 0.5, iso_metric: identity}]"], "search.points[1] repeats"),
    (["search.algorithm=points", "search.points=[{lambda_iso: 0.1, p: 1.5, iso_metric: identity}]"], "search.points.0.p"),
    (["search.algorithm=points", "search.points=[{lambda_iso: 0.1, p: 0.5, iso_metric: identity, iso_timesteps: mixed}]"],
     "iso_timesteps"),
])
def test_bad_points_are_refused_with_the_field(overrides, message):
    from isosweep.spec.fields import SpecError

    with pytest.raises(SpecError) as err:
        load_spec(DEMO, overrides)
    assert message in str(err.value)


class _WritesMarker:
    """Unpickling this object creates the file `path`: the code a planted searcher state would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_searcher_state_is_json_a_running_trial_finishes_after_a_restore_and_a_pickle_never_loads(tmp_path):
    """The searcher state holds no pickle: a restore from it tells the finished trials to a fresh study and asks
    a running one again under its Tune id, whose result then reaches the study, and the search goes on with new
    points. A pickle planted in its place is never loaded (no code runs) and the baseline is not suggested again."""
    import json
    import pickle

    spec = load_spec(DEMO, ["search.num_trials=6"])
    space, alg, _ = build_search(spec, "demo-2")
    got = _suggestions(alg, space, 7, 4)  # t0 the baseline, t1..t3 searched
    alg.on_trial_complete("t0", {"fid": 9.0, "ppl": 6.0})
    alg.on_trial_complete("t1", {"fid": 10.0, "ppl": 5.0})
    alg.on_trial_complete("t2", {"fid": 11.0, "ppl": 4.0})  # t3 still running
    path = tmp_path / "searcher-state-x.pkl"
    alg.save(str(path))
    state = json.loads(path.read_text())  # plain JSON
    assert state["baseline_trial"] == "t0" and list(state["study"]["running"]) == ["t3"]

    fresh_space, fresh, _ = build_search(spec, "demo-2")
    fresh.set_search_properties(None, None, fresh_space)
    fresh.restore(str(path))
    study = fresh.inner._ot_study
    assert sorted(tuple(t.values) for t in study.trials if t.state.name == "COMPLETE") == [(10.0, 5.0), (11.0, 4.0)]
    assert study.user_attrs["baseline"]["trial_id"] == "t0"
    fresh.on_trial_complete("t3", {"fid": 8.0, "ppl": 3.0})  # the running trial, restarted by Tune, ends
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and any(t.params["lambda_iso"] == got[3]["lambda_iso"] and t.values == [8.0, 3.0] for t in done)
    nxt = fresh.suggest("t4")
    assert nxt["baseline"] is False and nxt["lambda_iso"] not in {g["lambda_iso"] for g in got}

    marker = tmp_path / "payload-ran"
    path.write_bytes(pickle.dumps(_WritesMarker(marker)))
    _, planted, _ = build_search(spec, "demo-2")
    planted.set_search_properties(None, None, fresh_space)
    planted.restore(str(path))
    assert not marker.exists()
    assert planted.suggest("t9")["baseline"] is False  # the baseline is never run twice
