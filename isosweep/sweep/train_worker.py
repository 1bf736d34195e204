"""What each Ray Train worker of a trial runs: `train_loop_per_worker` wraps Ray's context in a `Reporter`, hands
the plain training loop the evaluation suite as its evaluator (and the cheap FID that selects the trial's step as its
scorer), both reporting their progress as Ray metrics (`monitoring`), and MLflow's downloader for `models:/` base
models. Only the workers import this module (torch, diffusers, the evaluation suite): `sweep.trainer` builds the
TorchTrainer without it, so the Tune trial process and Train's controller start light.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint

from isosweep.console import say
from isosweep.evaluation.suite import checkpoint_fid_scorer, trial_evaluator
from isosweep.files import remove_orphaned_scratch
from isosweep.models.loading import Fetch
from isosweep.models.sources import is_model_uri
from isosweep.spec import resolve_trial_spec
from isosweep.sweep.monitoring import EvalProgress, TrainMetrics
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


def step_line(step: int, max_steps: int | None, stats: str, eta: str = "", checkpoint: bool = False, trial: str = "") -> str:
    """A worker's progress line, `step 50/300 loss=... eta 2:28`, led by `trial NAME: ` when it trains a Tune trial
    (concurrent trials share one log); `isosweep train` has no trial and keeps the bare line."""
    total = f"/{max_steps}" if max_steps else ""
    line = f"step {step}{total} {stats}" + (f" eta {eta}" if eta else "") + (" (checkpoint)" if checkpoint else "")
    return f"trial {trial}: {line}" if trial else line


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
            eta = training_eta(self._first, (step, now), self.max_steps)
            say(step_line(step, self.max_steps, stats, eta, checkpoint is not None, self.trial if self.sweep else ""))

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
    remove_orphaned_scratch()  # checkpoint copies of workers killed on this machine (a whole model each)
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
