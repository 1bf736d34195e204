"""The sweep driver: Ray Tune over Ray Train trials, then selection, registry and report.

A sweep is one Tune experiment named `<spec name>-<timestamp>` (the sweep id) under the storage path
(`results.layout`). Each Tune trial (`trial.py`) runs one TorchTrainer whose workers train and then
evaluate. The baseline (lambda_iso = 0) is always the sweep's first trial (`search.py`). Selection is
on (FID, PPL): the Pareto front and a stated champion rule (`results.pareto`).
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray import tune

from isosweep import storage as st
from isosweep.console import say
from isosweep.evaluation.features.common import BackboneUnavailable
from isosweep.evaluation.features.resolver import load_feature_networks
from isosweep.evaluation.suite_metrics import selected
from isosweep.models.builtin import BUILTIN_SHAPES, pretrain_builtin
from isosweep.redact import REDACTED, scrub_text, scrub_tree
from isosweep.results.layout import (
    DONE_MARKER,
    REPORT_DIR,
    SPEC_FILE,
    STATE_FILE,
    TRAIN_DIR,
    new_sweep_id,
    read_state,
    resolve_storage,
    sweep_uri,
    train_storage,
)
from isosweep.results.plots import pareto_plot
from isosweep.results.report import write_report as write_report_folder
from isosweep.results.rows import SweepOutcome, summarize
from isosweep.results.states import COMPLETED, FAILED, INTERRUPTED, RUNNING, SweepState, promotion_refusal, sweep_state
from isosweep.results.tables import backbones_of, save_tables
from isosweep.spec import SpecError, SweepSpec
from isosweep.sweep.callbacks import SweepProgress
from isosweep.sweep.full_eval import run_full_protocol
from isosweep.sweep.monitoring import SweepMetrics
from isosweep.sweep.ray_env import init_ray, quiet_libraries
from isosweep.sweep.resources import check_cluster_fits, trial_concurrency
from isosweep.sweep.search import build_search, planned_trials
from isosweep.sweep.trial import make_trial_fn, rows_from_results
from isosweep.tracking.artifacts import log_sweep_summary
from isosweep.tracking.client import TrackingError, resolve_tracking_uri
from isosweep.tracking.registry import register_sweep_models
from isosweep.tracking.runs import end_run, find_or_create_sweep_run
from isosweep.tracking.sync import sync_sweep_dir


@dataclass
class SweepPlace:
    """Where one sweep lives: its id, the storage it is under, its folder (the Tune experiment), the Train
    runs, and a local staging folder for the files written here and then uploaded (the sweep folder itself
    for local storage)."""

    sweep_id: str
    storage: str
    sweep_uri: str
    train_storage: str
    staging: Path
    staging_is_temporary: bool
    state: dict
    resuming: bool = False


def run_sweep(spec: SweepSpec, spec_path: str | None = None, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | None = None, report_dir: str | None = None, resume_sweep: str | None = None,
              dashboard: bool = True, write_report: bool = True, shared_fs: bool = False) -> SweepOutcome:
    """Run (or resume, given the sweep's URI) a sweep to completion and return its rows, front and champion."""
    quiet_libraries()
    place = _place(spec, storage, resume_sweep)
    try:
        return _run(spec, spec_path, place, address=address, tracking_uri=tracking_uri, report_dir=report_dir,
                    dashboard=dashboard, write_report=write_report, shared_fs=shared_fs)
    finally:
        st.remove_staging(place.staging, place.staging_is_temporary)


def _run(spec: SweepSpec, spec_path: str | None, place: SweepPlace, *, address: str | None, tracking_uri: str | None,
         report_dir: str | None, dashboard: bool, write_report: bool, shared_fs: bool) -> SweepOutcome:
    say(f"sweep {place.sweep_id}: storage {scrub_text(place.sweep_uri)}")
    tracking_uri = _tracking_uri(spec, tracking_uri, place)
    if address:  # joining a cluster is cheap: check it can run the sweep before minutes of preparation
        _start_ray(spec, spec_path, address, dashboard, place, tracking_uri, shared_fs)
    _prepare_base_model(spec)  # an embedded Ray starts after, so pretraining has the CPUs to itself
    _prepare_backbones(spec)
    if not address:
        _start_ray(spec, spec_path, address, dashboard, place, tracking_uri, shared_fs)
    parent_run_id = _open_sweep_run(spec, spec_path, tracking_uri, place)
    _save_state(place, spec, spec_path, tracking_uri, parent_run_id)
    say(f"MLflow: {scrub_text(tracking_uri)} (experiment '{spec.experiment_name}', parent run {parent_run_id})")
    try:
        results = _tuner(spec, place, tracking_uri, parent_run_id, resume=place.resuming).fit()
        rows = rows_from_results(results)
        run_full_protocol(spec, place.train_storage, rows, tracking_uri, trial_concurrency(spec)[0])  # evaluation.screening
        outcome = _outcome(spec, place, rows, tracking_uri, parent_run_id)
        return _finish(spec, place, outcome, report_dir=report_dir, write_report=write_report)
    except BaseException as exc:  # a second Ctrl-C, a crash: the sweep is resumable and its parent run ends
        interrupted = isinstance(exc, KeyboardInterrupt)
        _record_state(place, SweepState(INTERRUPTED if interrupted else FAILED), reason=type(exc).__name__)
        end_run(tracking_uri, parent_run_id, "KILLED" if interrupted else "FAILED", quiet=True)  # never hides exc
        say(f"sweep {place.sweep_id} {'interrupted' if interrupted else 'failed'}; continue it with: "
            f"isosweep resume {shlex.quote(scrub_text(place.sweep_uri))}")
        raise


def _tracking_uri(spec: SweepSpec, given: str | None, place: SweepPlace) -> str:
    """--tracking-uri, else the one the sweep recorded, else the spec's, MLFLOW_TRACKING_URI or the local
    default. A recorded or spec URI whose credentials were scrubbed cannot be used: the caller must give
    the URI again (credentials are never stored with a sweep)."""
    usable = [u for u in (given, place.state.get("tracking_uri"), spec.tracking.uri) if u and REDACTED not in u]
    if not usable and not os.environ.get("MLFLOW_TRACKING_URI") and place.state.get("tracking_uri"):
        raise SpecError(f"{scrub_text(place.sweep_uri)}: the sweep's tracking URI carried credentials, which isosweep never "
                        f"stores (saved as {place.state['tracking_uri']}); fix: pass --tracking-uri URI or set "
                        "MLFLOW_TRACKING_URI (or keep the URI plain and set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")
    return resolve_tracking_uri(None, usable[0] if usable else None, place.storage if not st.is_remote(place.storage) else None)


def _open_sweep_run(spec: SweepSpec, spec_path: str | None, tracking_uri: str, place: SweepPlace) -> str:
    """The sweep's parent run, waiting out a tracking outage at the start (`ISOSWEEP_TRACKING_START_WAIT_S`,
    default 300 s): a server restarting for a minute must not cost an overnight sweep. Nothing has
    trained yet, so when the wait runs out the sweep stops with the server named, and loses nothing."""
    wait_s = float(os.environ.get("ISOSWEEP_TRACKING_START_WAIT_S", "300"))
    poll_s = max(1.0, 5 * float(os.environ.get("ISOSWEEP_TRACKING_BACKOFF_S", "1.0")))
    start = time.monotonic()
    while True:
        try:
            return find_or_create_sweep_run(spec, spec_path, tracking_uri, place.sweep_id, storage_path=place.sweep_uri)
        except TrackingError as exc:
            waited = time.monotonic() - start
            if waited + poll_s > wait_s:
                raise TrackingError(f"{exc} Waited {waited:.0f} s at the sweep's start (ISOSWEEP_TRACKING_START_WAIT_S="
                                    f"{wait_s:.0f}); nothing was trained: run the same command again once the server is up") from exc
            say(f"waiting for MLflow at {scrub_text(tracking_uri)} ({waited:.0f} of {wait_s:.0f} s): the sweep starts when it answers")
            time.sleep(poll_s)


def _finish(spec: SweepSpec, place: SweepPlace, outcome: SweepOutcome, *, report_dir: str | None,
            write_report: bool) -> SweepOutcome:
    """Tables, plot and report for any state; registry, done marker and a FINISHED run only when completed."""
    tracking_uri, parent_run_id = outcome.tracking_uri, outcome.parent_run_id
    state = sweep_state(outcome.rows, planned_trials(spec))
    outcome.state = state
    unrecorded = _sync_pending(spec, place, outcome)
    refusal = promotion_refusal(state, outcome.rows, outcome.champion, tuple(spec.selection.objectives))
    if refusal is None and unrecorded:
        refusal = (f"MLflow lacks the records of {', '.join(unrecorded)}; once the server is back run "
                   f"`isosweep sync {scrub_text(place.sweep_uri)}`, then `isosweep promote`")
    outcome.promotion = refusal or ""
    csv_path, md_path = save_tables(outcome.rows, place.staging, spec.evaluation.bootstrap.level)
    plot = pareto_plot(outcome.rows, outcome.front, outcome.champion, place.staging / "pareto.png",
                       tuple(spec.selection.objectives), backbones_of(outcome.rows))
    if spec.tracking.register_champion and refusal is None:
        say("registry: registering the champion and the Pareto trials")
        try:
            outcome.registered = register_sweep_models(tracking_uri, spec.registry_name, outcome.champion.row, outcome.front, outcome.rows)
        except TrackingError as exc:
            outcome.promotion = f"the registry could not be reached ({exc}); run `isosweep promote` when it is back"
            say(f"registry: promoted nothing: {outcome.promotion}")
    elif spec.tracking.register_champion:
        say(f"registry: promoted nothing: {refusal}")
    if write_report and state.state != INTERRUPTED:
        folder = Path(report_dir) if report_dir else place.staging / REPORT_DIR
        outcome.report_dir = write_report_folder(spec, outcome, folder)
        if report_dir:
            st.upload_dir(folder, st.join(place.sweep_uri, REPORT_DIR))
    st.upload_dir(place.staging, place.sweep_uri)  # tables, plot and report: a no-op for local storage
    try:  # the sweep's results are safe in storage already: tracking here is best effort
        log_sweep_summary(tracking_uri, parent_run_id, csv_path=csv_path, md_path=md_path, pareto_png=plot,
                          champion_run_id=outcome.champion.row.get("mlflow_run_id") if outcome.champion and not outcome.promotion else None,
                          report_dir=outcome.report_dir)
    except TrackingError as exc:
        say(f"warning: the sweep's summary was not logged to MLflow ({exc}); the tables and report are in storage")
    _record_state(place, state, tracking_pending=unrecorded)
    if state.state == COMPLETED:
        st.write_json(st.join(place.sweep_uri, DONE_MARKER),
                      {"finished": time.time(), "champion": outcome.champion.row["trial_id"] if outcome.champion else None})
    end_run(tracking_uri, parent_run_id, {COMPLETED: "FINISHED", INTERRUPTED: "KILLED"}.get(state.state, "FAILED"), quiet=True)
    if place.staging_is_temporary:  # the local copies go with the staging folder: point at storage instead
        outcome.report_dir = None if not report_dir else outcome.report_dir
    return outcome


def _sync_pending(spec: SweepSpec, place: SweepPlace, outcome: SweepOutcome) -> list[str]:
    """Record in MLflow the finished trials whose tracking failed during the sweep (from storage, as
    `isosweep sync` does); returns the trial ids still unrecorded (the server is still down)."""
    pending = [r for r in outcome.rows if r["status"] == "DONE" and (r.get("tracking_pending") or not r.get("mlflow_run_id"))]
    if not pending or not outcome.tracking_uri:
        return []
    ids = [r["trial_id"] for r in pending]
    say(f"tracking: {len(ids)} finished trial(s) not fully recorded in MLflow ({', '.join(ids)}): syncing them from storage")
    try:
        with tempfile.TemporaryDirectory(prefix="isosweep-sync-") as tmp:
            local = Path(place.sweep_uri)
            if st.is_remote(place.sweep_uri):  # only what the pending trials need, not every checkpoint
                local = Path(tmp) / place.sweep_id
                st.write_json(str(local / STATE_FILE), place.state)
                for tid in ids:
                    st.download_dir(st.join(place.sweep_uri, TRAIN_DIR, tid), local / TRAIN_DIR / tid)
            synced = {tid: run_id for tid, run_id, _ in sync_sweep_dir(spec, None, outcome.tracking_uri, local, place.sweep_uri)}
    except Exception as exc:  # noqa: BLE001 -- best effort: whatever failed, the trials stay pending and are named
        say(f"warning: MLflow still lacks {', '.join(ids)} ({exc}); run `isosweep sync {scrub_text(place.sweep_uri)}` later")
        return ids
    for r in pending:
        if r["trial_id"] in synced:
            r["mlflow_run_id"], r["tracking_pending"] = synced[r["trial_id"]], False
    return [r["trial_id"] for r in pending if r["tracking_pending"] or not r["mlflow_run_id"]]


def _record_state(place: SweepPlace, state: SweepState, reason: str = "", tracking_pending: list[str] | None = None) -> None:
    """The sweep's state into its state file in storage (status, what is unfinished, when)."""
    place.state.update({"status": state.state, "unfinished": state.unfinished, "errored": state.errored,
                        "not_started": state.not_started, "status_reason": reason, "status_time": time.time(),
                        "tracking_pending": tracking_pending or []})
    try:
        st.write_json(st.join(place.sweep_uri, STATE_FILE), place.state)
    except OSError as exc:  # storage down: say so, but never replace the error being handled
        say(f"warning: could not record the sweep's state {state.state} in storage: {exc}")


def _place(spec: SweepSpec, storage: str | None, resume_sweep: str | None) -> SweepPlace:
    """A new sweep's place, or the one of the sweep being resumed (found where its state file is)."""
    if resume_sweep is not None:
        sweep = st.normalize(resume_sweep)
        state = read_state(sweep)
        sweep_id, root = state["sweep_id"], st.parent_of(sweep)
    else:
        state, root = {}, resolve_storage(spec, storage)
        sweep_id = new_sweep_id(spec)
    uri = sweep_uri(root, sweep_id)
    staging, temporary = st.staging_dir(uri, prefix=f"isosweep-{sweep_id}-")
    return SweepPlace(sweep_id, root, uri, train_storage(root, sweep_id), staging, temporary, state, resuming=resume_sweep is not None)


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
    try:
        metrics = selected(list(spec.evaluation.metrics))
    except ValueError as exc:
        raise SpecError(f"{spec.name}: {exc}") from None
    needs = tuple(dict.fromkeys(n for m in metrics for n in m.needs))  # the networks the spec's metrics use
    if not needs:
        return
    say("feature networks: resolving the evaluation backbone (the offline domain network is trained once and cached)")
    try:
        nets = load_feature_networks(spec.evaluation, spec.dataset, needs=needs, progress=True)
    except BackboneUnavailable as exc:
        raise SpecError(f"{spec.name}: field 'evaluation.backbone': {exc}") from None
    say(f"feature networks: {nets.family}")


def _start_ray(spec: SweepSpec, spec_path: str | None, address: str | None, dashboard: bool, place: SweepPlace,
               tracking_uri: str, shared_fs: bool) -> None:
    """Start or join Ray; check that one trial fits the cluster (an autoscaling cluster may add nodes) and,
    on a multi-node cluster, that every node can reach the storage and the tracking store."""
    info = init_ray(address, dashboard)
    source = spec_path or spec.name
    try:
        check_cluster_fits(spec, ray.cluster_resources(), source)
    except SpecError as exc:
        if not address:
            raise
        say(f"warning: {exc}\n  (connected by address: trials will queue until the autoscaler adds nodes)")
    if address and not shared_fs and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        reasons = [r for r in (st.machine_local_reason(place.storage, "storage"), st.machine_local_reason(tracking_uri, "tracking")) if r]
        if reasons:
            raise SpecError(f"{source}: {'; '.join(reasons)}, but this cluster has several nodes whose trials must write "
                            "there; fix: --storage s3://BUCKET/PREFIX and --tracking-uri http://MLFLOW:5000, or pass "
                            "--shared-fs if every node mounts the same file system at the same path")
    if info.get("dashboard_url"):
        say(f"Ray dashboard: {info['dashboard_url']} (token: `ray get-auth-token` if it asks)")


def _save_state(place: SweepPlace, spec: SweepSpec, spec_path: str | None, tracking_uri: str, parent_run_id: str) -> None:
    """The state file and the spec as it ran, in storage before any trial starts (a resume reads both back)."""
    resumed = place.resuming
    # no credential is ever stored (storage may be a bucket others read): URIs and the spec are scrubbed, and a
    # resume takes the credentials from its own arguments and environment (`_tracking_uri`)
    place.state.update({"sweep_id": place.sweep_id, "spec": scrub_tree(spec.to_dict()), "spec_path": spec_path,
                        "storage": scrub_text(place.storage), "experiment_path": scrub_text(place.sweep_uri),
                        "tracking_uri": scrub_text(tracking_uri), "parent_run_id": parent_run_id,
                        "started": place.state.get("started") or time.time(), "status": RUNNING})
    if resumed:
        place.state["resumed"] = [*place.state.get("resumed", []), time.time()]
    st.write_json(st.join(place.sweep_uri, STATE_FILE), place.state)
    st.write_bytes(st.join(place.sweep_uri, SPEC_FILE), yaml.safe_dump(scrub_tree(spec.to_dict()), sort_keys=False).encode())


def _tuner(spec: SweepSpec, place: SweepPlace, tracking_uri: str, parent_run_id: str, *, resume: bool) -> tune.Tuner:
    """A new Tuner over the spec's search, or the restored one of the sweep being resumed."""
    sweep = {"tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "train_storage": place.train_storage,
             "session": len(place.state.get("resumed", [])),  # a resume gives errored trials a fresh failure budget
             "sweep_id": place.sweep_id}  # the `sweep` tag of the trials' Ray metrics
    # the trial function only waits on its TorchTrainer: it holds no CPU (1 MB so the bundle is not empty)
    trainable = tune.with_resources(make_trial_fn(spec.to_dict(), sweep), {"CPU": 0, "memory": 2**20})
    if resume and tune.Tuner.can_restore(place.sweep_uri):
        say(f"resuming {place.sweep_id}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(place.sweep_uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if resume:
        say(f"resuming {place.sweep_id}: no Tune experiment was saved yet, so the search starts from its first trial")
    concurrency, why = trial_concurrency(spec)  # what the cluster can grow to, not what is up now
    space, alg, num_samples = build_search(spec, place.sweep_id, concurrency)
    say(f"search: {spec.search.algorithm}, {planned_trials(spec)} trials (baseline included), up to {concurrency} at once ({why})")
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=alg, num_samples=num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name=place.sweep_id,
            callbacks=[SweepProgress(planned_trials(spec), concurrency,  # and the sweep's Ray metrics (monitoring.py)
                                     SweepMetrics(place.sweep_id, planned_trials(spec), list(spec.selection.objectives)))],
            storage_path=place.storage,  # a URI with its query intact: Tune joins the name inside its path
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            verbose=1,
        ),
    )


def _outcome(spec: SweepSpec, place: SweepPlace, rows: list[dict], tracking_uri: str, parent_run_id: str) -> SweepOutcome:
    front, champion = summarize(spec, rows)
    return SweepOutcome(place.sweep_id, place.staging, rows, front, champion, tracking_uri=tracking_uri,
                        parent_run_id=parent_run_id, sweep_uri=place.sweep_uri)
