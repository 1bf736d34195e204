"""Ray Train adapter: one trial = one `TorchTrainer` run of `training.loop.train_loop` on N DDP workers.

`build_trainer` turns a spec into a TorchTrainer (gloo on CPU, NCCL on GPU; FailureConfig retries
restart every worker, on whichever nodes are alive, from the run's latest checkpoint);
`train_loop_per_worker` is the thin function each worker runs: it wraps Ray's context in a `Reporter`,
hands the loop the evaluation suite as its evaluator (and the cheap FID that selects the trial's step as
its scorer), both reporting their progress as Ray metrics (`monitoring`), MLflow's downloader for
`models:/` base models, and calls the plain training loop.

The tracking URI reaches the workers inside the function Ray ships to them, not in `train_loop_config`, which
Ray Train records in its run state (the dashboard shows it): a URI may carry credentials. Step metrics and a
`models:/` base model both use it, so a worker on any node reads the registry the driver uses.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from isosweep import storage as st
from isosweep.console import say
from isosweep.evaluation.suite import checkpoint_fid_scorer, trial_evaluator
from isosweep.models.loading import Fetch, is_model_uri
from isosweep.spec import SweepSpec, resolve_trial_spec
from isosweep.sweep.monitoring import EvalProgress, TrainMetrics
from isosweep.tracking.client import resolve_tracking_uri
from isosweep.tracking.steps import StepLogger
from isosweep.tracking.tracker import Tracker
from isosweep.training.loop import train_loop

PRINTED = ("loss", "dsm_loss", "iso_loss", "tr_r", "images_per_s")


def training_eta(first: tuple[int, float], now: tuple[int, float], max_steps: int | None) -> str:
    """Time left in training as "M:SS" from the pace since the first report; "" when it is unknown."""
    (s0, t0), (s1, t1) = first, now
    if not max_steps or s1 <= s0 or s1 >= max_steps:
        return ""
    left = (t1 - t0) / (s1 - s0) * (max_steps - s1)
    return f"{int(left // 60)}:{int(left % 60):02d}"


class RayReporter:
    """`training.Reporter` on top of Ray Train V2; rank 0 also logs to MLflow, Ray metrics and stdout."""

    def __init__(self, *, max_steps: int | None = None, step_logger=None, verbose: bool = True,
                 resume_from: str | None = None, sweep: str = "") -> None:
        ctx = ray.train.get_context()  # step_logger: a StepLogger (rank 0 of a trial with an MLflow run)
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.max_steps, self.step_logger, self.verbose, self.resume_from = max_steps, step_logger, verbose, resume_from
        self.sweep, self.trial = sweep, ctx.get_experiment_name()  # the Train run is named after the Tune trial
        self._gauges = TrainMetrics(self.sweep, self.trial) if self.rank == 0 else None
        self._first: tuple[int, float] | None = None  # (step, time) of this run's first report, for the ETA

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """To Ray Train (with `tracking_stopped`, the refusal's kind, once MLflow refused the trial's run: the trial
        function then makes no MLflow call of its own), then rank 0's step metrics, gauges and progress line."""
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if self.step_logger is not None and self.step_logger.stop.kind is not None:
            metrics = {**metrics, "tracking_stopped": self.step_logger.stop.kind}
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank != 0:
            return
        if self.step_logger is not None:
            self.step_logger.log(metrics, int(metrics["step"]))
        if self._gauges:
            self._gauges.report(metrics)
        if self.verbose:
            stats = " ".join(f"{k}={metrics[k]:.4g}" for k in PRINTED if k in metrics)
            step, now = int(metrics["step"]), time.monotonic()
            self._first = self._first or (step, now)
            total = f"/{self.max_steps}" if self.max_steps else ""
            eta = training_eta(self._first, (step, now), self.max_steps)
            say(f"step {step}{total} {stats}" + (f" eta {eta}" if eta else "") + (" (checkpoint)" if checkpoint else ""))

    def latest_checkpoint(self) -> Any:
        """The run's own latest checkpoint (after a worker failure), else `resume_from`: a Ray Checkpoint
        (file system + path) or a local folder. The loop verifies it against its manifest, falls back to
        older siblings when it is corrupt, and copies remote ones into temporary folders it removes."""
        ckpt = ray.train.get_checkpoint()
        return ckpt if ckpt is not None else self.resume_from


def _quiet_train_reports() -> None:
    """Ray Train logs every report in full at INFO through a logger named by its file path (outside
    `ray.train`, so LoggingConfig misses it); our one-line progress already says the same."""
    try:
        from ray.train.v2._internal.execution import context as train_context  # private, and may move: guarded
    except ImportError:  # a Ray version without this module: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any], tracking_uri: str | None = None) -> None:
    """What every Train worker runs. config keys: spec (dict), trial_params, evaluate, mlflow ({run_id}: rank 0
    logs step metrics and the base model it started from into that run), resume_from, sweep_id (the `sweep` tag of
    the Ray metrics; "" outside a sweep). tracking_uri: where the run is and where a `models:/` base model is looked
    up (`build_trainer` binds it)."""
    _quiet_train_reports()
    spec = resolve_trial_spec(config["spec"], config.get("trial_params"))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_id = (config.get("mlflow") or {}).get("run_id") if tracking_uri else None
    # one tracker for the step metrics and the base model's tags: a refusal of either stops both (said once)
    tracker = Tracker(tracking_uri, f"trial {ctx.get_experiment_name()}", config.get("sweep_uri")) if run_id else None
    step_logger = StepLogger(tracking_uri, run_id, stop=tracker.stop) if tracker and rank == 0 else None
    reporter = RayReporter(max_steps=spec.train.max_steps, step_logger=step_logger, verbose=config.get("verbose", True),
                           resume_from=config.get("resume_from"), sweep=config.get("sweep_id", ""))
    progress = EvalProgress(reporter.sweep, reporter.trial, rank)
    try:
        fetch, base = base_model_fetch(spec.base_model.source, tracking_uri, reporter.world_size)
        train_loop(spec, reporter, trial_params=config.get("trial_params"),  # recorded in each checkpoint's spec.json
                   provenance={"workers": worker_placement(reporter.rank, reporter.world_size), "base_model": base},
                   evaluator=trial_evaluator(spec, progress) if config.get("evaluate") else None,
                   scorer=checkpoint_fid_scorer(spec, progress) if config.get("evaluate") else None,  # evaluation.checkpoint_fid
                   fetch_base=fetch, on_base=lambda started: _record_base(started, tracker, run_id, config.get("verbose", True)))
    except BaseException:
        if step_logger is not None:
            step_logger.close(raise_errors=False)  # a tracking error must not hide the training error
        raise
    if step_logger is not None:  # step curves are best effort: an outage must not fail a trained trial
        step_logger.close(raise_errors=False)


def base_model_fetch(source: str, tracking_uri: str | None, world_size: int = 1) -> tuple[Fetch | None, dict[str, str]]:
    """The downloader every rank loads an MLflow base model with, and what it pins (`{resolved, version}`).

    `models:/NAME@ALIAS` (or `/latest`) is resolved to its version once, by rank 0, and every rank downloads that
    version: the alias may move while the workers start, and the trial records the version it trained from.
    Other sources need no downloader (None, {}). MLflow is imported here, only for an MLflow base model."""
    if not is_model_uri(source):
        return None, {}
    from isosweep.tracking.models import fetcher, pin_model_uri

    pinned: list[Any] = [None]
    if world_size == 1 or torch.distributed.get_rank() == 0:
        pinned[0] = pin_model_uri(source, tracking_uri)
    if world_size > 1:  # every rank calls this (a collective), before any rank loads
        torch.distributed.broadcast_object_list(pinned, src=0)
    uri, version = pinned[0]
    return fetcher(tracking_uri, {source: uri}), {"resolved": uri, **({"version": version} if version else {})}


def _record_base(started: dict[str, Any], tracker: Tracker | None, run_id: str | None, verbose: bool) -> None:
    """Rank 0, once the loop knows which weights the trial started from: a progress line, and tags on the trial's
    run (tags, not params: a restart before the first checkpoint may start from a moved alias). Best effort."""
    if verbose:
        pinned = f" = {started['resolved']}" if started.get("resolved", started["source"]) != started["source"] else ""
        say(f"base model: {started['source']}{pinned} (unet sha256 {started['unet_sha256'][:16]})")  # scrubbed by the loop
    if not (tracker and run_id):
        return
    tracker.best_effort("logging the base model's tags to MLflow", "each checkpoint's spec.json records it",
                        tracker.log_tags, "log the base model's tags", run_id,
                        {f"isosweep.base_model.{k}": v for k, v in started.items()})


def worker_placement(rank: int, world_size: int) -> list[dict[str, Any]]:
    """Every rank's node id and host name (Ray's), in rank order: a collective, so every rank calls it."""
    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    if world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def build_trainer(spec: SweepSpec, *, run_name: str, storage_path: str, trial_params: dict[str, Any] | None = None,
                  evaluate: bool = False, mlflow: dict[str, str] | None = None, resume_from: str | None = None,
                  callbacks: list | None = None, extra_config: dict[str, Any] | None = None,
                  max_failures: int | None = None, tracking_uri: str | None = None) -> TorchTrainer:
    """A TorchTrainer for one trial. max_failures: Train's own retries (default `search.max_failures`);
    the sweep's trials pass 0 and retry in the trial function, which tells deterministic errors apart.
    mlflow: {tracking_uri, run_id} of the trial's run. tracking_uri: the sweep's tracking URI, also when it has no
    run (a tracking outage at the trial's start), for a `models:/` base model; default the run's, else
    `worker_tracking_uri`.

    Re-running with the same `run_name` and `storage_path` restores that run from its latest
    checkpoint (Ray Train V2); `resume_from` starts a new run from a checkpoint directory.

    Failures (Ray Train V2 in Ray 2.60, `train/v2/_internal/execution/failure_handling/default.py`): a
    worker that dies, its node included (a node that vanishes without notice: the GCS marks it dead
    once its health checks fail, and its workers' deaths surface as a `WorkerGroupError`), is retried
    `search.max_failures` times. Each retry starts a fresh worker group wherever the resources are,
    handing every worker the latest *registered* checkpoint, which the loop resumes from
    (`RayReporter.latest_checkpoint` -> `ray.train.get_checkpoint()`); tests/test_resources.py kills a
    node to show it. A node drained with a preemption notice (spot reclaim) is counted apart, without
    limit (`max_preemption_failures=-1`). While a lost node is replaced, the new group's placement group
    times out every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and is retried without limit (a
    controller error, `controller_failure_limit=-1`). The controller itself runs on the node of the
    caller (the Tune trial); if that node dies, Tune retries the trial, whose new TorchTrainer of the
    same `run_name` restores this run from `storage_path`, which must be shared (S3, NFS).
    """
    res = spec.resources
    tracking_uri = tracking_uri or (mlflow or {}).get("tracking_uri")
    if not tracking_uri and is_model_uri(spec.base_model.source):  # where the driver's sweep would track: see worker_tracking_uri
        tracking_uri = worker_tracking_uri(spec, storage_path)
    config = {"spec": spec.to_dict(), "trial_params": dict(trial_params or {}), "evaluate": evaluate,
              "mlflow": {k: v for k, v in mlflow.items() if k != "tracking_uri"} if mlflow else None,
              "resume_from": resume_from, **(extra_config or {})}
    resources = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        resources["GPU"] = res.gpus_per_worker
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    return TorchTrainer(
        _bound(tracking_uri),
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=res.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            # worker and node failures: search.max_failures; spot preemptions: Ray's default, unlimited
            failure_config=FailureConfig(max_failures=spec.search.max_failures if max_failures is None else max_failures,
                                         max_preemption_failures=-1),
            checkpoint_config=CheckpointConfig(num_to_keep=3),  # the last three (the final one included)
            callbacks=callbacks,
            # Train logs each report, checkpoint and resource request at INFO; our progress line says it
            logging_config=LoggingConfig(log_level=os.environ.get("ISOSWEEP_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )


def worker_tracking_uri(spec: SweepSpec, storage_path: str) -> str:
    """The tracking URI a run without one given uses, resolved in the driver, whose environment and arguments are the
    user's (a worker on another node may lack MLFLOW_TRACKING_URI): the spec's, MLFLOW_TRACKING_URI, else the local
    store a sweep with this storage uses (`tracking.client.resolve_tracking_uri`)."""
    return resolve_tracking_uri(spec.tracking.uri, None, None if st.is_remote(storage_path) else storage_path)


def _bound(tracking_uri: str | None) -> Callable[[dict[str, Any]], None]:
    """`train_loop_per_worker` with the tracking URI bound: it travels with the function, outside the recorded config."""

    def isosweep_train_worker(config: dict[str, Any]) -> None:
        train_loop_per_worker(config, tracking_uri)

    return isosweep_train_worker
