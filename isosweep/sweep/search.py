"""The search: Tune's search space and algorithm for the spec, with the baseline trial always first.

The baseline (lambda_iso = 0, `spec.BASELINE_PARAMS`) is injected in front of any searcher: as a
`points_to_evaluate` entry for random, grid and points (where `search.points` follow it), and by `BaselineFirst` for Optuna, so the searcher's
model never sees it (its lambda_iso = 0 lies outside a log-uniform space and would corrupt TPE).

The Optuna study is held in memory and travels in the searcher state that Tune saves into the sweep's
experiment folder in storage, as JSON (the study's trials, never a pickle: storage is not trusted to hold
code), so a resume on another machine tells the whole history to a fresh study (no finished point is
suggested as new, TPE keeps what it learned). Each save also writes `optuna.journal` there,
Optuna's plain-text journal format, for `optuna-dashboard`. The study names its objectives (`fid`, `ppl`:
`selection.objectives`) and holds the baseline's result as its user attribute `baseline`, which is all
the study ever learns of the baseline.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from isosweep.console import warn
from isosweep.spec import BASELINE_PARAMS, POINT_KEYS, TRIAL_KEYS, SweepSpec
from isosweep.spec import load as _spec_load

# defined with the spec, so that `isosweep list` counts a sweep's trials without importing Ray; named here for its callers
planned_trials = _spec_load.planned_trials
JOURNAL_FILE = "optuna.journal"  # beside Tune's searcher state in <sweep>/: `optuna-dashboard <sweep>/optuna.journal`
BASELINE_ATTR = "baseline"  # the study's user attribute with the baseline trial's id, parameters and objectives


class BaselineFirst(Searcher):
    """Suggests the baseline first, then delegates to the inner searcher; the baseline's result is never
    given to the inner searcher as a trial (an Optuna study records it as its user attribute `baseline`)."""

    def __init__(self, inner: Searcher, baseline: dict):
        self.inner = inner
        self.baseline = dict(baseline)
        self.baseline_trial: str | None = None
        super().__init__(metric=inner.metric, mode=inner.mode)

    def set_search_properties(self, metric, mode, config, **spec):
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        _name_objectives(self.inner)
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.inner.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        if self.baseline_trial is None:
            self.baseline_trial = trial_id
            return dict(self.baseline)
        suggestion = self.inner.suggest(trial_id)
        if isinstance(suggestion, dict):
            suggestion = {**suggestion, "baseline": False}
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id != self.baseline_trial:
            self.inner.on_trial_complete(trial_id, result=result, error=error)
            return
        study = getattr(self.inner, "_ot_study", None)
        if study is not None:  # shown by optuna-dashboard beside the searched trials, never used by TPE
            objectives = {m: _json_number((result or {}).get(m)) for m in _objectives(self.inner)}
            study.set_user_attr(BASELINE_ATTR, {"trial_id": trial_id, "state": "FAILED" if error else "COMPLETE",
                                                **{k: v for k, v in self.baseline.items() if k != "baseline"}, **objectives})

    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON (never a pickle: the file lives in storage): the baseline and the Optuna
        study's trials, the running ones with their Tune trial ids."""
        _export_journal(self.inner, Path(checkpoint_path).parent / JOURNAL_FILE)
        state = {"format": STATE_FORMAT, "baseline_trial": self.baseline_trial, "baseline": self.baseline,
                 "study": _study_state(self.inner)}
        tmp = f"{checkpoint_path}.tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        """Read the JSON state `save` wrote and tell its trials to the (empty) study again; a running trial is asked
        anew with its parameters pinned, under its Tune trial id, so its result reaches the study when it ends. A state
        that is not this JSON (a pickle of an older isosweep, or a planted one) is never loaded: the search then goes on
        without its history, and says so."""
        data = Path(checkpoint_path).read_bytes()
        try:
            state = json.loads(data)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError("not isosweep's searcher state")
        except ValueError:
            warn(f"{Path(checkpoint_path).name}: not isosweep's JSON searcher state (an older sweep's pickle is never "
                 "loaded), so the search continues without its history: no baseline again, TPE learns anew")
            self.baseline_trial = self.baseline_trial or "unknown"
            return
        self.baseline_trial = state["baseline_trial"]
        self.baseline = dict(state["baseline"])
        if state.get("study") is not None:
            _restore_study(self.inner, state["study"])
            _name_objectives(self.inner)


STATE_FORMAT = "isosweep-searcher-1"


def _study_state(searcher: Searcher) -> dict | None:
    """The Optuna study's trials and user attributes as JSON values; which Tune trials are still running."""
    study = getattr(searcher, "_ot_study", None)
    if study is None:
        return None
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "user_attrs": t.user_attrs,
               "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
               "values": [_json_number(v) for v in t.values] if t.values else None}
              for t in study.get_trials(deepcopy=False)]
    running = {tid: ot.number for tid, ot in searcher._ot_trials.items() if tid not in searcher._completed_trials}
    return {"trials": trials, "user_attrs": study.user_attrs, "running": running,
            "completed": sorted(searcher._completed_trials)}


def _restore_study(searcher: Searcher, state: dict) -> None:
    """Tell the saved trials to the searcher's study: finished ones as they ended, running ones asked again. Tune sets
    the search space (which makes the study) before it restores; without it the study is made here."""
    if searcher._ot_study is None:
        searcher._setup_study(searcher._mode)
    study = searcher._ot_study
    for key, value in state["user_attrs"].items():
        study.set_user_attr(key, value)
    by_number = {}
    for t in state["trials"]:
        dists = {k: optuna.distributions.json_to_distribution(d) for k, d in t["distributions"].items()}
        by_number[t["number"]] = (t["params"], dists)
        trial_state = optuna.trial.TrialState[t["state"]]
        if trial_state.is_finished():
            values = t["values"] if trial_state == optuna.trial.TrialState.COMPLETE else None
            study.add_trial(optuna.trial.create_trial(state=trial_state, params=t["params"], distributions=dists,
                                                      values=values, user_attrs=t["user_attrs"]))
    for tune_id, number in state["running"].items():
        if number in by_number:
            params, dists = by_number[number]
            study.enqueue_trial(params, skip_if_exists=False)
            searcher._ot_trials[tune_id] = study.ask(fixed_distributions=dists)
    searcher._completed_trials = set(state["completed"])


def _objectives(searcher: Searcher) -> list[str]:
    metric = searcher.metric
    return list(metric) if isinstance(metric, (list, tuple)) else [metric] if metric else []


def _name_objectives(searcher: Searcher) -> None:
    """Name the Optuna study's objectives after the searcher's metrics (`fid`, `ppl`), as its plots and
    optuna-dashboard then label them; OptunaSearch itself leaves them unnamed."""
    study = getattr(searcher, "_ot_study", None)
    names = _objectives(searcher)
    if study is None or len(names) != len(study.directions) or study.metric_names == names:
        return
    with warnings.catch_warnings():  # set_metric_names is marked experimental (since Optuna 3.2)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def _json_number(value) -> float | None:
    """A finite float, else None: the journal is JSON, and NaN/inf are not."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _export_journal(searcher: Searcher, path: Path) -> None:
    """Write the Optuna study (if any) to `path` as an Optuna journal, replacing it atomically."""
    study = getattr(searcher, "_ot_study", None)
    if study is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(tmp))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # else "A new study created" at every save (~10 s)
    try:
        optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                          to_storage=optuna.storages.JournalStorage(backend))
    finally:
        optuna.logging.set_verbosity(verbosity)
    os.replace(tmp, path)


def build_search(spec: SweepSpec, study_name: str, max_concurrent: int = 0):
    """(param_space, search_alg, num_samples) for the spec's algorithm, with the baseline first.

    max_concurrent (0: no limit) goes into BasicVariantGenerator itself: Tune applies
    `TuneConfig.max_concurrent_trials` only to Searchers and silently ignores it for random and grid.
    For random and grid the baseline point uses up one sample, so num_samples is num_trials + 1.
    """
    s = spec.search
    if s.algorithm == "points":
        # every point names every key (train's seed and iso_timesteps where it sets none), and the space is a choice
        # of exactly the values the points take: Tune then shows them as the trials' columns and never samples
        fill = {"iso_timesteps": spec.train.iso_timesteps, "seed": spec.train.seed}
        points = [{**dict(BASELINE_PARAMS), **fill}] + [{**fill, **point.as_config()} for point in s.points]
        space = {k: tune.choice(sorted({q[k] for q in points}, key=str)) for k in TRIAL_KEYS + POINT_KEYS}
        space["baseline"] = False
        alg = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent, random_state=s.seed)
        return space, alg, len(points)
    if s.algorithm in ("grid", "random"):
        if s.algorithm == "grid":
            space = {k: tune.grid_search(list(getattr(s, k).values)) for k in TRIAL_KEYS}
        else:
            space = {k: _domain(getattr(s, k)) for k in TRIAL_KEYS}
        space["baseline"] = False
        alg = BasicVariantGenerator(points_to_evaluate=[dict(BASELINE_PARAMS)], max_concurrent=max_concurrent,
                                    random_state=s.seed)
        return space, alg, s.num_trials + 1
    inner = OptunaSearch(
        metric=list(spec.selection.objectives),
        mode=["min", "min"],
        sampler=optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.num_trials // 2))),
        study_name=study_name,  # in memory: the history travels in Tune's searcher state (module docstring)
    )
    return {k: _domain(getattr(s, k)) for k in TRIAL_KEYS}, BaselineFirst(inner, BASELINE_PARAMS), s.num_trials + 1


def _domain(dist):
    if dist.type == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    if dist.type == "uniform":
        return tune.uniform(dist.low, dist.high)
    return tune.choice(list(dist.values))
