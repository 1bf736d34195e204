"""The sweep driver: Ray Tune over Ray Train trials, then selection, registry and report.

A sweep is one Tune experiment named `<spec name>-<timestamp>` (the sweep id) under the storage path
(`results.layout`). Each Tune trial (`trial.py`) runs one TorchTrainer whose workers train and then
evaluate. The baseline (lambda_iso = 0) is always the sweep's first trial (`search.py`). Selection is
on (FID, PPL): the Pareto front and a stated champion rule (`results.selection`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune import ExperimentAnalysis

from isosweep.config import SpecError, SweepSpec
from isosweep.console import say
from isosweep.evaluation.features.common import BackboneUnavailable
from isosweep.evaluation.features.resolver import load_feature_networks
from isosweep.files import read_json, write_json_atomic
from isosweep.models.builtin import BUILTIN_SHAPES, pretrain_builtin
from isosweep.results.layout import (
    DONE_MARKER,
    STATE_FILE,
    default_report_dir,
    experiment_path,
    local_state_dir,
    new_sweep_id,
    resolve_storage,
    train_storage,
)
from isosweep.results.plots import pareto_plot
from isosweep.results.report import write_report as write_report_folder
from isosweep.results.rows import SweepOutcome, make_row, summarize
from isosweep.results.tables import backbones_of, save_tables
from isosweep.sweep.callbacks import SweepProgress
from isosweep.sweep.ray_env import init_ray, quiet_libraries
from isosweep.sweep.resources import check_cluster_fits, max_concurrent
from isosweep.sweep.search import build_search, planned_trials
from isosweep.sweep.trial import make_trial_fn, rows_from_results
from isosweep.tracking.artifacts import log_sweep_summary
from isosweep.tracking.client import resolve_tracking_uri
from isosweep.tracking.registry import register_sweep_models
from isosweep.tracking.runs import end_run, find_or_create_sweep_run


@dataclass
class SweepPlace:
    """Where one sweep lives: its id, storage, the Tune experiment, the Train runs and the local state folder."""

    sweep_id: str
    storage: str
    experiment_path: str
    train_storage: str
    state_dir: Path
    state: dict


def run_sweep(spec: SweepSpec, spec_path: str | None = None, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | None = None, report_dir: str | None = None, resume_dir: Path | None = None,
              dashboard: bool = True, write_report: bool = True) -> SweepOutcome:
    """Run (or resume) a sweep to completion and return its rows, front and champion."""
    quiet_libraries()
    place = _place(spec, storage, resume_dir)
    say(f"sweep {place.sweep_id}: storage {place.experiment_path}")
    _prepare_base_model(spec)  # before Ray starts, so pretraining has the CPUs to itself
    _prepare_backbones(spec)
    _start_ray(spec, spec_path, address, dashboard)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, tracking_uri or place.state.get("tracking_uri"), str(place.state_dir.parent))
    parent_run_id = find_or_create_sweep_run(spec, spec_path, tracking_uri, place.sweep_id, storage_path=place.experiment_path)
    _save_state(place, spec, spec_path, tracking_uri, parent_run_id)
    say(f"MLflow: {tracking_uri} (experiment '{spec.experiment_name}', parent run {parent_run_id})")
    results = _tuner(spec, place, tracking_uri, parent_run_id, resume=resume_dir is not None).fit()
    outcome = _outcome(spec, place, rows_from_results(results), tracking_uri, parent_run_id)
    csv_path, md_path = save_tables(outcome.rows, place.state_dir)
    plot = pareto_plot(outcome.rows, outcome.front, outcome.champion, place.state_dir / "pareto.png",
                       tuple(spec.selection.objectives), backbones_of(outcome.rows))
    if outcome.champion and spec.tracking.register_champion:
        say("registry: registering the champion and the Pareto trials")
        outcome.registered = register_sweep_models(tracking_uri, spec.registry_name, outcome.champion.row, outcome.front, outcome.rows)
    if write_report:
        folder = Path(report_dir) if report_dir else default_report_dir(place.storage, place.sweep_id)
        outcome.report_dir = write_report_folder(spec, outcome, folder)
    log_sweep_summary(tracking_uri, parent_run_id, csv_path=csv_path, md_path=md_path, pareto_png=plot,
                      champion_run_id=outcome.champion.row.get("mlflow_run_id") if outcome.champion else None,
                      report_dir=outcome.report_dir)
    write_json_atomic(place.state_dir / DONE_MARKER, {"finished": time.time(),
                                                      "champion": outcome.champion.row["trial_id"] if outcome.champion else None})
    end_run(tracking_uri, parent_run_id, "FINISHED" if all(r["status"] == "DONE" for r in outcome.rows) else "FAILED")
    return outcome


def load_outcome(sweep_dir: Path) -> tuple[SweepSpec, SweepOutcome]:
    """Rebuild a sweep's rows from its Tune experiment directory (running or finished)."""
    state = json.loads((sweep_dir / STATE_FILE).read_text())
    spec = SweepSpec.model_validate(state["spec"])
    analysis = ExperimentAnalysis(state["experiment_path"])
    rows = [make_row(t.trial_id, dict(t.config or {}), dict(t.last_result or {}), t.status) for t in analysis.trials]
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    front, champion = summarize(spec, rows)
    return spec, SweepOutcome(state["sweep_id"], sweep_dir, rows, front, champion,
                              tracking_uri=state.get("tracking_uri"), parent_run_id=state.get("parent_run_id"))


def _place(spec: SweepSpec, storage: str | None, resume_dir: Path | None) -> SweepPlace:
    """A new sweep's place, or the one recorded in the state file of the sweep being resumed."""
    storage = resolve_storage(spec, storage)
    state = read_json(resume_dir / STATE_FILE) if resume_dir is not None else {}
    if resume_dir is not None and not state.get("sweep_id"):
        raise SpecError(f"{resume_dir / STATE_FILE}: unreadable or without a sweep_id, so the sweep cannot be resumed "
                        "from it; fix: restore the file from a backup, or start a new sweep with `isosweep run`")
    sweep_id = state["sweep_id"] if state else new_sweep_id(spec)
    return SweepPlace(sweep_id, storage, experiment_path(storage, sweep_id), train_storage(storage, sweep_id),
                      local_state_dir(storage, sweep_id), state)


def _prepare_base_model(spec: SweepSpec) -> None:
    """Pretrain (or find in the cache) the built-in base model once, in the driver."""
    if spec.base_model.source == BUILTIN_SHAPES:
        say("base model: preparing the built-in base model (cached after the first run)")
        pretrain_builtin(spec.base_model, spec.dataset)


def _prepare_backbones(spec: SweepSpec) -> None:
    """Resolve and cache the feature networks once in the driver, before trials start.

    Fails early when standard weights are asked for but missing, and keeps concurrent trials from
    each training the offline domain network.
    """
    needs = tuple(m for m in spec.evaluation.metrics if m in ("fid", "ppl", "ls"))
    if not needs:
        return
    say("feature networks: resolving the evaluation backbone (the offline domain network is trained once and cached)")
    try:
        nets = load_feature_networks(spec.evaluation, spec.dataset, needs=needs, progress=True)
    except BackboneUnavailable as exc:
        raise SpecError(f"{spec.name}: field 'evaluation.backbone': {exc}") from None
    say(f"feature networks: {nets.family}")


def _start_ray(spec: SweepSpec, spec_path: str | None, address: str | None, dashboard: bool) -> None:
    """Start or join Ray and check that one trial fits the cluster (an autoscaling cluster may add nodes)."""
    info = init_ray(address, dashboard)
    try:
        check_cluster_fits(spec, ray.cluster_resources(), spec_path or spec.name)
    except SpecError as exc:
        if not address:
            raise
        say(f"warning: {exc}\n  (connected by address: trials will queue until the autoscaler adds nodes)")
    if info.get("dashboard_url"):
        say(f"Ray dashboard: {info['dashboard_url']} (token: `ray get-auth-token` if it asks)")


def _save_state(place: SweepPlace, spec: SweepSpec, spec_path: str | None, tracking_uri: str, parent_run_id: str) -> None:
    place.state.update({"sweep_id": place.sweep_id, "spec": spec.to_dict(), "spec_path": spec_path, "storage": place.storage,
                        "experiment_path": place.experiment_path, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id})
    write_json_atomic(place.state_dir / STATE_FILE, place.state)


def _tuner(spec: SweepSpec, place: SweepPlace, tracking_uri: str, parent_run_id: str, *, resume: bool) -> tune.Tuner:
    """A new Tuner over the spec's search, or the restored one of the sweep being resumed."""
    sweep = {"tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "train_storage": place.train_storage}
    # the trial function only waits on its TorchTrainer: it holds no CPU (1 MB so the bundle is not empty)
    trainable = tune.with_resources(make_trial_fn(spec.to_dict(), sweep), {"CPU": 0, "memory": 2**20})
    if resume and tune.Tuner.can_restore(place.experiment_path):
        say(f"resuming {place.sweep_id}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(place.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    concurrency = max_concurrent(spec, ray.cluster_resources())
    space, alg, num_samples = build_search(spec, place.state_dir, concurrency)
    say(f"search: {spec.search.algorithm}, {planned_trials(spec)} trials (baseline included), up to {concurrency} at once")
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=alg, num_samples=num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name=place.sweep_id,
            callbacks=[SweepProgress(planned_trials(spec), concurrency)],
            storage_path=place.storage,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            verbose=1,
        ),
    )


def _outcome(spec: SweepSpec, place: SweepPlace, rows: list[dict], tracking_uri: str, parent_run_id: str) -> SweepOutcome:
    front, champion = summarize(spec, rows)
    return SweepOutcome(place.sweep_id, place.state_dir, rows, front, champion, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
