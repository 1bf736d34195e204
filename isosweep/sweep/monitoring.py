"""Ray metrics (`ray.util.metrics` gauges) of sweeps, trials and evaluations: the one owner of their names.

Each gauge is set by the process that knows its number:

- training: rank 0 of a trial's Train run, at every report (`TrainMetrics`);
- evaluation: every rank of a trial's Train run, after every batch of every metric (`EvalProgress`, the
  `evaluation.suite.Progress` callback; the evaluation layer itself never imports Ray);
- the sweep: the driver, from its Tune callback (`SweepMetrics`, fed by `callbacks.SweepProgress`).

Ray exports a gauge named `isosweep_x` as `ray_isosweep_x` on the metrics export port of the node whose
process set it, with its tags as labels beside Ray's own (`SessionName`, `NodeAddress`, `WorkerId`, ...).
A value lasts while its process lives: the process sends its gauges to the node's agent every report
interval (`RAY_metrics_report_interval_ms`, 10 s), and the agent drops a value two intervals after its
process stopped sending it. Prometheus keeps the history. `clusters/monitoring/` has the scrape config,
the Grafana dashboard and the KubeRay PodMonitor that use these names (tests/test_monitoring.py checks them).

Metrics are a nicety: a gauge that cannot be created or set never fails a trial or a sweep.
"""

from __future__ import annotations

import math
from typing import Any

from ray.util.metrics import Gauge

from isosweep.console import warn

EXPORT_PREFIX = "ray_"  # what Ray's exporter puts in front of every name below

SWEEP_TAGS = ("sweep",)
TRIAL_TAGS = ("sweep", "trial")

# training, rank 0 of each trial: the report key -> its description; TRAIN_GAUGES: the report key -> its gauge
_TRAIN = {"step": "optimizer steps done", "loss": "total training loss (denoising + lambda_iso x isometry)",
          "dsm_loss": "denoising loss", "iso_loss": "isometry loss", "images_per_s": "training throughput, images per second"}
TRAIN_GAUGES = {key: f"isosweep_train_{key}" for key in _TRAIN}
# evaluation, every rank of each trial, per metric being computed (`evaluation.suite.Progress` names them)
EVAL_DONE, EVAL_PLANNED, EVAL_RUNNING = "isosweep_eval_samples_done", "isosweep_eval_samples_planned", "isosweep_eval_running"
EVAL_TAGS = ("sweep", "trial", "rank", "metric")
# the sweep, from the driver
SWEEP_TRIALS, SWEEP_PLANNED = "isosweep_sweep_trials", "isosweep_sweep_trials_planned"
SWEEP_BEST, SWEEP_BASELINE, TRIAL_OBJECTIVE = "isosweep_sweep_best", "isosweep_sweep_baseline", "isosweep_trial_objective"
SWEEP_ETA = "isosweep_sweep_eta_seconds"
TRIAL_STATES = ("pending", "running", "done", "failed")  # the `state` tag of SWEEP_TRIALS; they add up to the plan

# every gauge isosweep sets: name -> (description, tag keys)
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{TRAIN_GAUGES[key]: (description, TRIAL_TAGS) for key, description in _TRAIN.items()},
    EVAL_DONE: ("units of the metric done on this rank (samples; pairs for ppl and mrtl; Jacobians for jacobian)", EVAL_TAGS),
    EVAL_PLANNED: ("units of the metric this rank computes", EVAL_TAGS),
    EVAL_RUNNING: ("1 while this rank computes the metric, 0 once it is done", EVAL_TAGS),
    SWEEP_TRIALS: ("trials of the sweep by state: pending, running, done, failed", ("sweep", "state")),
    SWEEP_PLANNED: ("trials the sweep runs, the baseline included", SWEEP_TAGS),
    SWEEP_BEST: ("lowest value of the objective among finished trials so far, the baseline included", ("sweep", "objective")),
    SWEEP_BASELINE: ("the baseline trial's value of the objective", ("sweep", "objective")),
    TRIAL_OBJECTIVE: ("a finished trial's value of the objective", ("sweep", "trial", "objective", "baseline")),
    SWEEP_ETA: ("seconds until the sweep ends, from the mean duration of the trials finished in this run", SWEEP_TAGS),
}

_made: dict[str, Gauge] = {}  # one Gauge per name and process
_failed: set[str] = set()  # names whose failure was logged


def exported_name(name: str) -> str:
    """The name Prometheus sees for one of the gauges above."""
    return EXPORT_PREFIX + name


def _gauge(name: str) -> Gauge:
    if name not in _made:
        description, tag_keys = GAUGES[name]
        _made[name] = Gauge(name, description=description, tag_keys=tag_keys)
    return _made[name]


def _set(name: str, value: float, tags: dict[str, str]) -> bool:
    """Set one gauge; False (logged once per name) where Ray's metrics are unavailable."""
    try:
        _gauge(name).set(float(value), tags=tags)
        return True
    except Exception as exc:  # noqa: BLE001 -- metrics are a nicety: never fail a trial over them
        if name not in _failed:
            _failed.add(name)
            warn(f"Ray metric {name} not set: {exc}")
        return False


class TrainMetrics:
    """The training gauges of one trial (rank 0): `report(metrics)` sets those whose key is present."""

    def __init__(self, sweep: str, trial: str) -> None:
        self.tags = {"sweep": sweep, "trial": trial}

    def report(self, metrics: dict[str, Any]) -> None:
        for key, name in TRAIN_GAUGES.items():
            if key in metrics and _finite(metrics[key]):
                _set(name, metrics[key], self.tags)


class EvalProgress:
    """`evaluation.suite.Progress` for one rank of one trial: `(metric, done, total)` sets its gauges."""

    def __init__(self, sweep: str, trial: str, rank: int) -> None:
        self.tags = {"sweep": sweep, "trial": trial, "rank": str(rank)}

    def __call__(self, metric: str, done: int, total: int) -> None:
        tags = {**self.tags, "metric": metric}
        _set(EVAL_PLANNED, total, tags)
        _set(EVAL_DONE, done, tags)
        _set(EVAL_RUNNING, 1.0 if done < total else 0.0, tags)


class SweepMetrics:
    """The sweep's gauges, set by the driver from what Tune knows about its trials."""

    def __init__(self, sweep: str, planned: int, objectives: list[str]) -> None:
        self.sweep, self.planned, self.objectives = sweep, planned, list(objectives)

    def publish(self, counts: dict[str, int], finished: list[tuple[str, bool, dict[str, Any]]], eta_s: float | None) -> None:
        """counts: trials by state (TRIAL_STATES; pending is what the others leave of the plan); finished:
        (trial id, is baseline, last result) of each finished trial; eta_s: None while unknown."""
        tags = {"sweep": self.sweep}
        _set(SWEEP_PLANNED, self.planned, tags)
        for state in TRIAL_STATES:
            _set(SWEEP_TRIALS, counts.get(state, 0), {**tags, "state": state})
        for objective in self.objectives:
            values = []
            for trial_id, baseline, result in finished:
                value = result.get(objective)
                if not _finite(value):
                    continue
                values.append(float(value))
                _set(TRIAL_OBJECTIVE, value, {**tags, "trial": trial_id, "objective": objective,
                                              "baseline": "true" if baseline else "false"})
                if baseline:
                    _set(SWEEP_BASELINE, value, {**tags, "objective": objective})
            if values:
                _set(SWEEP_BEST, min(values), {**tags, "objective": objective})
        if eta_s is not None:
            _set(SWEEP_ETA, max(0.0, eta_s), tags)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
