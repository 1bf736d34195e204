"""`isosweep sync`: upload to MLflow what a sweep's storage holds and its tracking server lacks."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from mlflow.exceptions import MlflowException

from isosweep import storage as st
from isosweep.console import warn
from isosweep.evaluation.record import EVAL_DIR, RECORD_FILE, read_record, record_path
from isosweep.files import read_json
from isosweep.results.full_eval_records import full_eval_uri
from isosweep.results.layout import SCREENED_VALUES, STATE_FILE, TRAIN_DIR, trial_id_from_path
from isosweep.tracking.artifacts import (
    EVAL_ARTIFACT_PATH,
    CheckpointArtifactError,
    checkpoint_gaps,
    is_uploaded,
    log_final_metrics,
    log_trial_result,
)
from isosweep.tracking.client import client, retry_call
from isosweep.tracking.runs import end_run, find_or_create_sweep_run, find_trial_run, open_trial_run


def _trial_info(ckpt: Path, sweep_dir: Path | None = None) -> tuple[str | None, dict]:
    """(trial id, params) of a checkpoint dir.

    The id comes from `trial_params.json` {"trial_id", "params"}, else `spec.json` ("trial_id"),
    else the layout `<sweep>/train/<trial id>/checkpoint_*` (a trial's Train run is named after it).
    Params come from trial_params.json, else spec.json's "trial_params".
    """
    tp = read_json(ckpt / "trial_params.json")
    sp = read_json(ckpt / "spec.json")
    params = tp.get("params") or sp.get("trial_params") or sp.get("params") or {}
    tid = tp.get("trial_id") or sp.get("trial_id")
    if not tid and sweep_dir is not None:
        tid = trial_id_from_path(ckpt, sweep_dir)
    return (str(tid) if tid else None), dict(params) if isinstance(params, dict) else {}


def find_trial_results(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Per trial id, its final checkpoint dir under `sweep_dir`: a dir holding `eval/metrics.json`
    whose trial id `_trial_info` can tell; of several, the one evaluated last."""
    sweep_dir = Path(sweep_dir)
    found: dict[str, Path] = {}
    for metrics_file in sweep_dir.rglob(f"{EVAL_DIR}/{RECORD_FILE}"):
        ckpt = metrics_file.parent.parent
        tid, _ = _trial_info(ckpt, sweep_dir)
        if not tid:
            warn(f"sync: {ckpt} has results but no trial id (trial_params.json, spec.json or train/<id>/); skipped")
            continue
        if tid not in found or metrics_file.stat().st_mtime > record_path(found[tid]).stat().st_mtime:
            found[tid] = ckpt
    return found


def _sweep_parent(spec: Any, spec_path: str | None, tracking_uri: str, sweep_dir: Path, storage_path: str) -> str:
    """The parent run recorded in the sweep's state file if the server has it, else found/created by sweep id."""
    state = read_json(sweep_dir / STATE_FILE)
    rid = state.get("parent_run_id")
    if rid:
        try:
            retry_call("get run", tracking_uri, client(tracking_uri).get_run, rid)
            return rid
        except MlflowException:
            pass  # recorded on another tracking server: create it here
    sid = state.get("sweep_id") or sweep_dir.name  # what the driver tagged the parent run with
    return find_or_create_sweep_run(spec, spec_path, tracking_uri, sid, storage_path=storage_path)


def is_sync_metadata(rel: str) -> bool:
    """Whether the file at `rel` in a sweep folder is what sync reads to decide (JSON records and every evaluation
    folder), as opposed to the weights and training state it uploads only where a run lacks them."""
    path = PurePosixPath(rel)
    return path.suffix == ".json" or EVAL_DIR in path.parts[:-1]


def sync_sweep_dir(
    spec: Any, spec_path: str | None, tracking_uri: str, sweep_dir: str | os.PathLike, storage_path: str | None = None,
    remote: str | None = None,
) -> list[tuple[str, str, list[str]]]:
    """Upload what one sweep folder holds but its MLflow runs lack; returns [(trial_id, run_id, uploaded)].

    For each trial checkpoint found (`find_trial_results`): create the child run if missing; log
    metrics from `eval/metrics.json` that the run lacks; upload `checkpoint/` again when the run's copy lacks a
    file of the local checkpoint or holds one with another size (a cut-off upload), and check it after; log `eval/`
    if the run has none; end the run FINISHED if anything was uploaded. Complete runs are left alone.

    `remote`: the sweep URI that `sweep_dir` is a copy of, holding only what `is_sync_metadata` keeps; a checkpoint's
    other files are compared by the remote listing's sizes and downloaded only for a run whose copy lacks them, so a
    sweep whose runs are complete costs its JSON and evaluation files, not its weights.
    """
    sweep_dir = Path(sweep_dir)
    parent = _sweep_parent(spec, spec_path, tracking_uri, sweep_dir, storage_path or str(sweep_dir.parent))
    c = client(tracking_uri)
    exp_id = retry_call("get run", tracking_uri, c.get_run, parent).info.experiment_id
    done = []
    for tid, ckpt in sorted(find_trial_results(sweep_dir).items()):
        record = read_record(ckpt)
        file_metrics = record.metrics if record is not None else {}
        _, params = _trial_info(ckpt, sweep_dir)
        run = find_trial_run(tracking_uri, exp_id, parent, tid)
        uploaded: list[str] = []
        if run is None:
            run_id = open_trial_run(tracking_uri, exp_id, parent, tid, params)
            have_metrics: set[str] = set()
            uploaded.append("run")
        else:
            run_id, have_metrics = run.info.run_id, set(run.data.metrics)
        metrics = {k: v for k, v in file_metrics.items() if k not in have_metrics}
        source = st.join(remote, *ckpt.relative_to(sweep_dir).parts) if remote else None
        elsewhere = {r: n for r, n in st.file_sizes(source).items() if not (ckpt / r).is_file()} if source else {}
        need_ckpt = bool(checkpoint_gaps(tracking_uri, run_id, ckpt, elsewhere))
        if need_ckpt and elsewhere:
            st.download_dir(source, ckpt, keep=lambda r, wanted=elsewhere: r in wanted and is_uploaded(r))
        need_eval = not retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, EVAL_ARTIFACT_PATH)
        if metrics or need_ckpt or need_eval or uploaded:
            log_trial_result(tracking_uri, run_id, ckpt, only_metrics=set(metrics), log_eval=need_eval, log_checkpoint=need_ckpt)
            if need_ckpt and (gaps := checkpoint_gaps(tracking_uri, run_id, ckpt)):  # counts as uploaded once it is all there
                raise CheckpointArtifactError(tid, run_id, gaps)
            uploaded += (["metrics:" + ",".join(sorted(metrics))] if metrics else []) + (["checkpoint"] if need_ckpt else []) + (["eval"] if need_eval else [])
            end_run(tracking_uri, run_id, "FINISHED")
        if _sync_full_record(tracking_uri, run_id, Path(full_eval_uri(str(sweep_dir / TRAIN_DIR), tid)), file_metrics, run):
            uploaded.append("full evaluation")
        done.append((tid, run_id, uploaded))
    return done


def _sync_full_record(tracking_uri: str, run_id: str, path: Path, screened: dict, run: Any) -> bool:
    """A screened trial's full-protocol record (evaluation.screening) onto its run, after the screening numbers:
    `fid`, `ppl`, ... become the full ones (the newest value at step 0 wins) and `screen_<name>` keeps the
    screening ones. Skipped when the run already has them; returns whether anything was logged."""
    full = read_json(path).get("metrics") or {}
    if not full:
        return False
    have = dict(run.data.metrics) if run is not None else {}
    values = {k: float(v) for k, v in full.items() if k in SCREENED_VALUES}
    values.update({f"screen_{k}": float(v) for k, v in screened.items() if k in SCREENED_VALUES})
    if run is not None and all(have.get(k) == v for k, v in values.items()):
        return False
    log_final_metrics(tracking_uri, run_id, values, tags={"isosweep.fidelity": "full"})
    return True


