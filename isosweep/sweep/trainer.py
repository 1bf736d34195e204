"""Ray Train adapter: one trial = one `TorchTrainer` run of `training.loop.train_loop` on N DDP workers.

`build_trainer` turns a spec into a TorchTrainer (gloo on CPU, NCCL on GPU; FailureConfig retries
restart every worker, on whichever nodes are alive, from the run's latest checkpoint). What each worker runs is
`sweep.train_worker.train_loop_per_worker`, imported inside the worker function: the Tune trial process and Train's
controller, which only hold the function, never import torch's training stack, diffusers or the evaluation suite
(about ten seconds and half a gigabyte less for each, at every trial start).

The tracking URI reaches the workers inside the function Ray ships to them, not in `train_loop_config`, which
Ray Train records in its run state (the dashboard shows it): a URI may carry credentials. Step metrics and a
`models:/` base model both use it, so a worker on any node reads the registry the driver uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from isosweep import storage as st
from isosweep.models.sources import is_model_uri
from isosweep.spec import SweepSpec
from isosweep.tracking.client import resolve_tracking_uri

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
        from isosweep.sweep.train_worker import train_loop_per_worker  # in the worker only (see the module's docstring)

        train_loop_per_worker(config, tracking_uri)

    return isosweep_train_worker
