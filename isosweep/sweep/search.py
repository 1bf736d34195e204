"""The search: Tune's search space and algorithm for the spec, with the baseline trial always first.

The baseline (lambda_iso = 0, `spec.BASELINE_PARAMS`) is injected in front of any searcher: as a
`points_to_evaluate` entry for random, grid and points (where `search.points` follow it), and by `BaselineFirst` for Optuna, so the searcher's
model never sees it (its lambda_iso = 0 lies outside a log-uniform space and would corrupt TPE).

The Optuna study is held in memory and travels in the searcher state that Tune saves into the sweep's
experiment folder in storage, so a resume on another machine restores the whole history (no finished
point is suggested as new, TPE keeps what it learned). Each save also writes `optuna.journal` there,
Optuna's plain-text journal format, for `optuna-dashboard`. The study names its objectives (`fid`, `ppl`:
`selection.objectives`) and holds the baseline's result as its user attribute `baseline`, which is all
the study ever learns of the baseline.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

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
        _export_journal(self.inner, Path(checkpoint_path).parent / JOURNAL_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            inner_path = os.path.join(tmp, "inner.pkl")
            self.inner.save(inner_path)
            inner_bytes = Path(inner_path).read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"baseline_trial": self.baseline_trial, "baseline": self.baseline, "inner": inner_bytes}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.baseline_trial = state["baseline_trial"]
        self.baseline = state["baseline"]
        with tempfile.TemporaryDirectory() as tmp:
            inner_path = os.path.join(tmp, "inner.pkl")
            Path(inner_path).write_bytes(state["inner"])
            self.inner.restore(inner_path)


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
