"""MLflow runs: one parent run per sweep, one child run per trial, found again by their tags.

Layout (docs/tracking.md): experiment = `spec.experiment_name`; the sweep is a parent run tagged
`isosweep.role=sweep` and `isosweep.sweep_id`; each trial is a child run tagged `mlflow.parentRunId`,
`isosweep.role=trial` and `isosweep.trial_id`. Runs are created and reopened through `MlflowClient`
with explicit run ids, so any process (the driver, a Tune trial, a Train rank-0 worker) can log to
them; `nested=True` is not used because it only works inside one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from mlflow.exceptions import MlflowException

import isosweep
from isosweep.console import warn
from isosweep.redact import scrub_text, scrub_tree
from isosweep.tracking.client import (
    MAX_PARAMS_TAGS_PER_BATCH,
    TrackingError,
    chunks,
    client,
    local_artifact_location,
    params_of,
    refusal,
    retry_call,
    retrying,
    tags_of,
)

TAG_ROLE = "isosweep.role"
TAG_SWEEP_ID = "isosweep.sweep_id"
TAG_SWEEP_NAME = "isosweep.sweep_name"
TAG_STORAGE = "isosweep.storage"
TAG_TRIAL_ID = "isosweep.trial_id"
TAG_CHAMPION = "isosweep.champion_run_id"
TAG_PARENT = "mlflow.parentRunId"


@retrying("get or create experiment")
def get_or_create_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Experiment id of `name`, creating it (artifact_location: e.g. s3://bucket/prefix for client-side S3)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location or local_artifact_location(tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id  # another process won the race


def _experiment_id(tracking_uri: str, experiment_id_or_name: str) -> str:
    c = client(tracking_uri)
    if str(experiment_id_or_name).isdigit():
        exp = retry_call("get experiment", tracking_uri, c.get_experiment, str(experiment_id_or_name))
        if exp is not None:
            return exp.experiment_id
    return get_or_create_experiment(tracking_uri, str(experiment_id_or_name))


def make_sweep_id(spec_name: str, storage_path: str) -> str:
    """Stable id of one sweep: its name and where its storage lives (same id on resume)."""
    loc = storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
    return hashlib.sha1(f"{spec_name}\n{loc}".encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def find_or_create_sweep_run(
    spec: Any,
    spec_path: str | os.PathLike | None,
    tracking_uri: str,
    sweep_id: str | None = None,
    *,
    storage_path: str | None = None,
    artifact_location: str | None = None,
    fresh: bool = False,
) -> str:
    """The sweep's parent run id: reuses the run tagged `isosweep.sweep_id=<sweep_id>` (resume), else creates it.

    spec: a `SweepSpec`; sweep_id: the sweep's stable id (default: a hash of spec.name and the
    storage path, see `make_sweep_id`); storage_path: the effective storage (default
    spec.storage.path; recorded as a tag). Logs the resolved config as params (flattened, scrubbed,
    truncated to MLflow's limits), the spec file and resolved config as `spec/` artifacts (scrubbed
    text), the git commit and isosweep version as tags. `fresh=True` always creates a new parent run.
    """
    storage = str(storage_path or spec.storage.path)
    sid = sweep_id or make_sweep_id(spec.name, storage)
    exp_id = get_or_create_experiment(tracking_uri, spec.experiment_name, artifact_location)
    c = client(tracking_uri)
    if not fresh:
        runs = retry_call(
            "search sweep runs", tracking_uri, c.search_runs, [exp_id],
            filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sid}' and tags.`{TAG_ROLE}` = 'sweep'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                retry_call("reopen sweep run", tracking_uri, c.update_run, run_id, status="RUNNING")
            return run_id
    tags = {
        TAG_ROLE: "sweep",
        TAG_SWEEP_ID: sid,
        TAG_SWEEP_NAME: spec.name,
        TAG_STORAGE: storage,
        "isosweep.version": isosweep.__version__,
        "mlflow.runName": spec.name,
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["isosweep.git_commit"] = commit
    def _existing() -> Any:
        found = c.search_runs([exp_id], filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sid}' and tags.`{TAG_ROLE}` = 'sweep'",
                              max_results=1)
        return found[0] if found else None

    run = retry_call("create sweep run", tracking_uri, c.create_run, exp_id, tags={t.key: t.value for t in tags_of(tags)},
                     run_name=spec.name, already_done=None if fresh else _existing)
    run_id = run.info.run_id
    params = params_of(spec.to_dict())
    for chunk in chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        retry_call("log sweep params", tracking_uri, c.log_batch, run_id, params=list(chunk))
    with tempfile.TemporaryDirectory() as tmp:
        if spec_path and Path(spec_path).is_file():
            (Path(tmp) / Path(spec_path).name).write_text(scrub_text(Path(spec_path).read_text()))
        (Path(tmp) / "resolved_spec.yaml").write_text(scrub_text(yaml.safe_dump(scrub_tree(spec.to_dict()), sort_keys=False)))
        retry_call("log spec", tracking_uri, c.log_artifacts, run_id, tmp, "spec")
    return run_id




def find_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    """The existing child run of `trial_id` under `parent_run_id` (an mlflow Run), or None.
    experiment_id: an id, or an experiment name."""
    experiment_id = _experiment_id(tracking_uri, experiment_id)
    c = client(tracking_uri)
    runs = retry_call(
        "search trial runs", tracking_uri, c.search_runs, [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        order_by=["attributes.start_time ASC"], max_results=5,
    )
    return runs[0] if runs else None


def open_trial_run(
    tracking_uri: str,
    experiment_id_or_name: str,
    parent_run_id: str,
    trial_id: str,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Create the trial's child run, or reopen (status RUNNING) the one this trial already has.

    Safe to call from any process (Tune trial, Train rank 0) and on every retry: the run is found by
    its tags `mlflow.parentRunId` + `isosweep.trial_id`, so a retried trial never duplicates its run.
    Params already logged are not logged again (MLflow params are immutable).
    """
    exp_id = _experiment_id(tracking_uri, experiment_id_or_name)
    c = client(tracking_uri)
    existing = find_trial_run(tracking_uri, exp_id, parent_run_id, trial_id)
    if existing is not None:
        run_id = existing.info.run_id
        if existing.info.status != "RUNNING":
            retry_call("reopen trial run", tracking_uri, c.update_run, run_id, status="RUNNING")
        have = existing.data.params
    else:
        tags = {TAG_PARENT: parent_run_id, TAG_TRIAL_ID: trial_id, TAG_ROLE: "trial", "mlflow.runName": trial_id}
        run = retry_call("create trial run", tracking_uri, c.create_run, exp_id, tags={t.key: t.value for t in tags_of(tags)},
                         run_name=trial_id, already_done=lambda: find_trial_run(tracking_uri, exp_id, parent_run_id, trial_id))
        run_id, have = run.info.run_id, {}
    new = [p for p in params_of(params or {}) if p.key not in have]
    for chunk in chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
        retry_call("log trial params", tracking_uri, c.log_batch, run_id, params=list(chunk))
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", *, quiet: bool = False) -> None:
    """Terminate a run: FINISHED, FAILED or KILLED (a crashed trial's run must end FAILED).

    quiet=True logs a warning instead of raising when the server stays unreachable or refuses (use it in an
    `except` block so the tracking error does not replace the trial's own error).
    """
    status = status.upper()
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run status must be FINISHED, FAILED or KILLED (got {status!r})")
    try:
        retry_call("end run", tracking_uri, client(tracking_uri).set_terminated, run_id, status=status)
    except Exception as exc:  # noqa: BLE001 -- quiet: an outage or a refusal (401/403, a deleted run) is a warning
        if not quiet or not (isinstance(exc, TrackingError) or refusal(exc)):
            raise
        warn(f"could not mark run {run_id} {status}: {scrub_text(str(exc))[:400]}")


@contextlib.contextmanager
def run_guard(tracking_uri: str, run_id: str) -> Iterator[str]:
    """`with run_guard(uri, run_id):` ends the run FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    try:
        yield run_id
    except KeyboardInterrupt:
        end_run(tracking_uri, run_id, "KILLED", quiet=True)
        raise
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED", quiet=True)
        raise
    end_run(tracking_uri, run_id, "FINISHED")


