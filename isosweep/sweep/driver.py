"""The sweep driver: Ray Tune over Ray Train trials, then selection, registry and report.

A sweep is one Tune experiment named `<spec name>-<timestamp>` (the sweep id) under the storage path
(`results.layout`). Each Tune trial (`trial.py`) runs one TorchTrainer whose workers train and then
evaluate. The baseline (lambda_iso = 0) is always the sweep's first trial (`search.py`). Selection is
on (FID, PPL): the Pareto front and a stated champion rule (`results.pareto`).

`Sweep` holds what every step needs (the spec, where the sweep lives, its tracking store and parent run),
so each step is a method that takes only what is its own.
"""

from __future__ import annotations

import os
import shlex
import signal
import tempfile
from pathlib import Path

import ray
from ray import tune

from isosweep import storage as st
from isosweep.console import say, warn
from isosweep.evaluation.features.common import BackboneUnavailable
from isosweep.evaluation.features.resolver import load_feature_networks
from isosweep.evaluation.suite_metrics import selected
from isosweep.models.builtin import pretrain_builtin
from isosweep.models.sources import BUILTIN_SHAPES
from isosweep.redact import REDACTED, scrub_text
from isosweep.results.layout import STATE_FILE, TRAIN_DIR
from isosweep.results.lease import DriverLease
from isosweep.results.place import SweepPlace
from isosweep.results.publish import write_results
from isosweep.results.rows import SweepOutcome, summarize
from isosweep.results.states import COMPLETED, FAILED, INTERRUPTED, SweepState, promotion_refusal, sweep_state
from isosweep.spec import SpecError, SweepSpec
from isosweep.sweep.callbacks import StateSeal, SweepProgress, TrialRecords, attach
from isosweep.sweep.full_eval import run_full_protocol
from isosweep.sweep.monitoring import SweepMetrics
from isosweep.sweep.ray_env import init_ray, quiet_libraries
from isosweep.sweep.resources import check_cluster_fits, trial_concurrency
from isosweep.sweep.search import build_search, planned_trials
from isosweep.sweep.trial import make_trial_fn, rows_from_results
from isosweep.tracking.artifacts import CheckpointArtifactError
from isosweep.tracking.client import TrackingError
from isosweep.tracking.tracker import Tracker


def run_sweep(spec: SweepSpec, spec_path: str | None = None, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | None = None, report_dir: str | None = None, resume_sweep: str | None = None,
              dashboard: bool = True, write_report: bool = True, shared_fs: bool = False) -> SweepOutcome:
    """Run (or resume, given the sweep's URI) a sweep to completion and return its rows, front and champion."""
    quiet_libraries()
    place = SweepPlace.open(spec, storage, resume_sweep)
    lease = DriverLease.acquire(place.lease_uri, "resume" if resume_sweep else "run")  # one driver per sweep
    try:
        lease.keep_fresh(on_lost=_stop_this_driver)
        sweep = Sweep(spec, spec_path, place, tracking_uri)
        return sweep.run(address, dashboard=dashboard, shared_fs=shared_fs, report_dir=report_dir, write_report=write_report)
    finally:
        lease.release()
        st.remove_staging(place.staging, place.staging_is_temporary)


def _stop_this_driver(message: str) -> None:
    """Another driver took the sweep's lease: stop this one as Ctrl-C would (its trials end resumable)."""
    warn(message)
    os.kill(os.getpid(), signal.SIGINT)


class Sweep:
    """One sweep being run: its spec (checked once, at load), where it lives, and its tracking store."""

    def __init__(self, spec: SweepSpec, spec_path: str | None, place: SweepPlace, tracking_uri: str | None) -> None:
        self.spec, self.spec_path, self.place = spec, spec_path, place
        self.source = spec_path or spec.name  # how error lines name the spec
        say(f"sweep {place.sweep_id}: storage {scrub_text(place.sweep_uri)}")
        self.tracker = Tracker(self._tracking_uri(tracking_uri))
        self.parent_run_id = ""
        self.unrecorded: list[str] = []  # finished trials MLflow still lacks after the end-of-sweep sync

    def run(self, address: str | None, *, dashboard: bool, shared_fs: bool, report_dir: str | None,
            write_report: bool) -> SweepOutcome:
        """Prepare, start Ray, open the sweep's run, fit the trials, evaluate the screened ones, then publish the
        results and promote the champion. Any exit leaves the sweep resumable and its parent run ended."""
        place = self.place
        if address:  # joining a cluster is cheap: check it can run the sweep before minutes of preparation
            self.start_ray(address, dashboard, shared_fs)
        self.prepare()  # an embedded Ray starts after, so pretraining has the CPUs to itself
        if not address:
            self.start_ray(address, dashboard, shared_fs)
        self.open()
        try:
            rows = rows_from_results(self.tuner().fit())
            run_full_protocol(self.spec, place.train_storage, rows, self.tracker, trial_concurrency(self.spec)[0],
                              planned_trials(self.spec))
            front, champion = summarize(self.spec, rows)
            outcome = SweepOutcome(place.sweep_id, place.staging, rows, front, champion, tracking_uri=self.tracker.uri,
                                   parent_run_id=self.parent_run_id, sweep_uri=place.sweep_uri)
            files = self.publish(outcome, report_dir=report_dir, write_report=write_report)
            self.promote(outcome)
            self.close(outcome, files)
            if place.staging_is_temporary:  # the local copies go with the staging folder: point at storage instead
                outcome.report_dir = None if not report_dir else outcome.report_dir
            return outcome
        except BaseException as exc:  # a second Ctrl-C, a crash: the sweep is resumable and its parent run ends
            interrupted = isinstance(exc, KeyboardInterrupt)
            place.record_state(SweepState(INTERRUPTED if interrupted else FAILED), reason=type(exc).__name__)
            self.tracker.end_run(self.parent_run_id, "KILLED" if interrupted else "FAILED", quiet=True)  # never hides exc
            say(f"sweep {place.sweep_id} {'interrupted' if interrupted else 'failed'}; continue it with: "
                f"isosweep resume {shlex.quote(scrub_text(place.sweep_uri))}")
            raise

    def _tracking_uri(self, given: str | None) -> str:
        """--tracking-uri, else the one the sweep recorded, else the spec's, MLFLOW_TRACKING_URI or the local
        default. A recorded or spec URI whose credentials were scrubbed cannot be used: the caller must give
        the URI again (credentials are never stored with a sweep)."""
        place = self.place
        usable = [u for u in (given, place.state.get("tracking_uri"), self.spec.tracking.uri) if u and REDACTED not in u]
        if not usable and not os.environ.get("MLFLOW_TRACKING_URI") and place.state.get("tracking_uri"):
            raise SpecError(f"{scrub_text(place.sweep_uri)}: the sweep's tracking URI carried credentials, which isosweep never "
                            f"stores (saved as {place.state['tracking_uri']}); fix: pass --tracking-uri URI or set "
                            "MLFLOW_TRACKING_URI (or keep the URI plain and set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")
        return Tracker.resolve(usable[0] if usable else None, None, place.storage if not st.is_remote(place.storage) else None).uri

    def start_ray(self, address: str | None, dashboard: bool, shared_fs: bool) -> None:
        start_ray(self.spec, self.source, address, dashboard=dashboard, storage=self.place.storage,
                  tracking_uri=self.tracker.uri, shared_fs=shared_fs)

    def prepare(self) -> None:
        """The built-in base model pretrained (or found in the cache), and the feature networks resolved and
        cached, once in the driver: missing standard weights fail here, before any trial, and concurrent
        trials never each train the offline domain network."""
        spec = self.spec
        if spec.base_model.source == BUILTIN_SHAPES:
            say("base model: preparing the built-in base model (cached after the first run)")
            pretrain_builtin(spec.base_model, spec.dataset)
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

    def open(self) -> None:
        """The sweep's parent run (waiting out a tracking outage at the start: `ISOSWEEP_TRACKING_START_WAIT_S`,
        default 300 s; a server restarting for a minute must not cost an overnight sweep), then the state
        file and the spec as it ran, in storage before any trial starts (a resume reads both back)."""
        place, spec = self.place, self.spec
        self.parent_run_id = self.tracker.open_sweep_run(
            spec, self.spec_path, place.sweep_id, place.sweep_uri,
            wait_s=float(os.environ.get("ISOSWEEP_TRACKING_START_WAIT_S", "300")),
            poll_s=max(1.0, 5 * float(os.environ.get("ISOSWEEP_TRACKING_BACKOFF_S", "1.0"))))
        place.record_start(spec, self.spec_path, self.tracker.uri, self.parent_run_id)
        say(f"MLflow: {scrub_text(self.tracker.uri)} (experiment '{spec.experiment_name}', parent run {self.parent_run_id})")

    def tuner(self) -> tune.Tuner:
        """A new Tuner over the spec's search, or the restored one of the sweep being resumed."""
        spec, place = self.spec, self.place
        sweep = {"tracking_uri": self.tracker.uri, "parent_run_id": self.parent_run_id, "train_storage": place.train_storage,
                 "session": len(place.state.get("resumed", [])),  # a resume gives errored trials a fresh failure budget
                 "sweep_id": place.sweep_id,  # the `sweep` tag of the trials' Ray metrics
                 "sweep_uri": place.sweep_uri}  # what a trial whose tracking MLflow refused tells the user to `isosweep sync`
        # the trial function only waits on its TorchTrainer: it holds no CPU (1 MB so the bundle is not empty)
        trainable = tune.with_resources(make_trial_fn(spec.to_dict(), sweep), {"CPU": 0, "memory": 2**20})
        concurrency, why = trial_concurrency(spec)  # what the cluster can grow to, not what is up now
        attach(place.sweep_uri)  # the restored callbacks' URI, credentials included (tuner.pkl holds it scrubbed)
        if place.resuming and tune.Tuner.can_restore(place.sweep_uri):
            say(f"resuming {place.sweep_id}: finished trials are kept, unfinished ones continue from their checkpoints")
            started = place.state.get("trial_concurrency")
            if started and started != concurrency:  # a restored Tune experiment keeps the TuneConfig it started with
                warn(f"trials run at most {started} at once, as when this sweep started: a resumed Tune experiment keeps "
                     f"its concurrency, whatever search.max_concurrent_trials or the cluster now says ({concurrency}); "
                     f"the full evaluations of screened trials do run {concurrency} at once. For {concurrency} trials at "
                     "once, start a new sweep")
            return tune.Tuner.restore(place.sweep_uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
        if place.resuming:
            say(f"resuming {place.sweep_id}: no Tune experiment was saved yet, so the search starts from its first trial")
        place.record_concurrency(concurrency)
        space, alg, num_samples = build_search(spec, place.sweep_id, concurrency)
        planned = planned_trials(spec)
        say(f"search: {spec.search.algorithm}, {planned} trials (baseline included), up to {concurrency} at once ({why})")
        return tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=alg, num_samples=num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=place.sweep_id,
                callbacks=[SweepProgress(planned, concurrency,  # and the sweep's Ray metrics (monitoring.py)
                                         SweepMetrics(place.sweep_id, planned, list(spec.selection.objectives))),
                           TrialRecords(place.sweep_uri),  # what `isosweep results`/`status` read
                           StateSeal(place.sweep_uri)],  # what `isosweep resume` checks before Tune unpickles its state
                storage_path=place.storage,  # a URI with its query intact: Tune joins the name inside its path
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                verbose=1,
            ),
        )

    def publish(self, outcome: SweepOutcome, *, report_dir: str | None, write_report: bool) -> dict[str, Path]:
        """Tables, plot and report in storage, for any state; first the finished trials MLflow lacks are synced,
        and whether the champion may be promoted is decided (`outcome.promotion`). Returns the files the
        parent run's summary logs."""
        spec, place = self.spec, self.place
        planned = planned_trials(spec)
        outcome.state = state = sweep_state(outcome.rows, planned)
        unrecorded = self._sync_pending(outcome)
        refusal = promotion_refusal(state, outcome.rows, outcome.champion, tuple(spec.selection.objectives))
        if refusal is None and unrecorded:
            refusal = (f"MLflow lacks the records of {', '.join(unrecorded)}; once the server is back run "
                       f"`isosweep sync {scrub_text(place.sweep_uri)}`, then `isosweep promote`")
        outcome.promotion = refusal or ""
        report = write_report and state.state != INTERRUPTED
        files = write_results(spec, outcome, place.staging, report=report, report_dir=Path(report_dir) if report_dir else None)
        st.upload_dir(place.staging, place.sweep_uri)  # tables, plot and report: a no-op for local storage
        self.unrecorded = unrecorded
        return files

    def promote(self, outcome: SweepOutcome) -> None:
        """The champion (alias `champion`) and the Pareto trials into the registry, when the sweep allows it."""
        if not self.spec.tracking.register_champion:
            return
        if outcome.promotion:
            say(f"registry: promoted nothing: {outcome.promotion}")
            return
        say("registry: registering the champion and the Pareto trials")
        sweep = scrub_text(self.place.sweep_uri)
        try:
            outcome.registered = self.tracker.register_sweep_models(self.spec.registry_name, outcome.champion.row,
                                                                    outcome.front, outcome.rows, sweep=sweep)
        except TrackingError as exc:
            outcome.promotion = f"the registry could not be reached ({exc}); run `isosweep promote` when it is back"
            say(f"registry: promoted nothing: {outcome.promotion}")
        except CheckpointArtifactError as exc:  # a cut-off upload: never the champion
            outcome.promotion = exc.line(sweep)
            say(f"registry: promoted nothing: {outcome.promotion}")

    def close(self, outcome: SweepOutcome, files: dict[str, Path]) -> None:
        """The summary on the parent run (best effort: storage has it all), the final state in storage, the done
        marker of a completed sweep, and the parent run ended."""
        state, champion = outcome.state, outcome.champion
        self.tracker.best_effort("logging the sweep's summary to MLflow", "the tables and report are in storage",
                                 self.tracker.log_sweep_summary, self.parent_run_id, **files,
                                 champion_run_id=champion.row.get("mlflow_run_id") if champion and not outcome.promotion else None)
        self.place.record_state(state, tracking_pending=self.unrecorded)
        if state.state == COMPLETED:
            self.place.record_done(champion.row["trial_id"] if champion else None)
        self.tracker.end_run(self.parent_run_id, {COMPLETED: "FINISHED", INTERRUPTED: "KILLED"}.get(state.state, "FAILED"), quiet=True)

    def _sync_pending(self, outcome: SweepOutcome) -> list[str]:
        """Record in MLflow the finished trials whose tracking failed during the sweep (from storage, as
        `isosweep sync` does); returns the trial ids still unrecorded (the server is still down)."""
        place = self.place
        pending = [r for r in outcome.rows if r["status"] == "DONE" and (r.get("tracking_pending") or not r.get("mlflow_run_id"))]
        if not pending:
            return []
        ids = [r["trial_id"] for r in pending]
        say(f"tracking: {len(ids)} finished trial(s) not fully recorded in MLflow ({', '.join(ids)}): syncing them from storage")
        try:
            with tempfile.TemporaryDirectory(prefix="isosweep-sync-") as tmp:
                local = Path(place.sweep_uri)
                if st.is_remote(place.sweep_uri):  # only what the pending trials need, not every checkpoint
                    local = Path(tmp) / place.sweep_id
                    for tid in ids:
                        st.download_dir(st.join(place.sweep_uri, TRAIN_DIR, tid), local / TRAIN_DIR / tid)
                    st.write_json(str(local / STATE_FILE), place.state)
                synced = {tid: run_id for tid, run_id, _ in self.tracker.sync_sweep_dir(self.spec, None, local, place.sweep_uri)}
        except Exception as exc:  # noqa: BLE001 -- best effort: whatever failed, the trials stay pending and are named
            warn(f"MLflow still lacks {', '.join(ids)} ({exc}); run `isosweep sync {scrub_text(place.sweep_uri)}` later")
            return ids
        for r in pending:
            if r["trial_id"] in synced:
                r["mlflow_run_id"], r["tracking_pending"] = synced[r["trial_id"]], False
        return [r["trial_id"] for r in pending if r["tracking_pending"] or not r["mlflow_run_id"]]


def start_ray(spec: SweepSpec, source: str, address: str | None, *, dashboard: bool, storage: str | None,
              tracking_uri: str, shared_fs: bool) -> None:
    """Start or join Ray; check that one trial fits the cluster (an autoscaling cluster may add nodes) and,
    on a multi-node cluster, that every node can reach the storage and the tracking store."""
    info = init_ray(address, dashboard)
    try:
        check_cluster_fits(spec, ray.cluster_resources(), source)
    except SpecError as exc:
        if not address:
            raise
        warn(f"{exc}\n  (connected by address: trials will queue until the autoscaler adds nodes)")
    if address and not shared_fs and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        reasons = [r for r in (st.machine_local_reason(storage, "storage"), st.machine_local_reason(tracking_uri, "tracking")) if r]
        if reasons:
            raise SpecError(f"{source}: {'; '.join(reasons)}, but this cluster has several nodes whose trials must write "
                            "there; fix: --storage s3://BUCKET/PREFIX and --tracking-uri http://MLFLOW:5000, or pass "
                            "--shared-fs if every node mounts the same file system at the same path")
    if info.get("dashboard_url"):
        say(f"Ray dashboard: {info['dashboard_url']} (token: `ray get-auth-token` if it asks)")
