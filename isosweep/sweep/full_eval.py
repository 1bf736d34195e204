"""Multi-fidelity evaluation, its second phase: the full protocol for the screened trials that can still win.

With `evaluation.screening`, every trial ends with FID and PPL at screening sizes, each with a bootstrap interval
(`trial.py`). Once Tune is done, `run_full_protocol` takes the rows that can still reach the Pareto front or the
champion rule (`results.pareto.contenders`: nobody beats them beyond the noise on both objectives; the
baseline always) and evaluates each at the full protocol (evaluation.fid, evaluation.ppl), sharded over the
trial's own worker count by a TorchTrainer that only evaluates. The record goes to
`<train storage>/<trial id>/isosweep_full_eval.json` (JSON: nothing read back can run code), so a resumed sweep
never evaluates a trial twice, and the row's `fid`/`ppl` (and intervals) become the full numbers with the
screening ones kept as `screen_*` and `fidelity: full`. The other rows keep `fidelity: screen` and are never
selected (`results.rows.summarize`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from isosweep import storage as st
from isosweep.console import say
from isosweep.evaluation.suite import trial_evaluator
from isosweep.models.loading import load_local_base
from isosweep.results.full_eval_records import apply_stored_records, full_eval_uri, read_full_record
from isosweep.results.layout import SCREENED_VALUES
from isosweep.results.pareto import contenders
from isosweep.spec import SweepSpec
from isosweep.tracking.tracker import Tracker
from isosweep.training.checkpoint import verify_checkpoint


def run_full_protocol(spec: SweepSpec, train_storage: str, rows: list[dict], tracker: Tracker | None,
                     concurrency: int, planned: int) -> list[str]:
    """Evaluate the contenders among the DONE rows at the full protocol (or read their stored record) and update
    their rows in place; returns the trial ids whose full evaluation failed (their rows turn ERROR, still `screen`).

    Only once all `planned` trials have ended: after a Ctrl-C or SIGTERM the screened trials wait for the resume,
    where the contenders are chosen among every trial (a full evaluation started now would hold the stop up for
    hours and might evaluate a trial that more trials would have dropped)."""
    if spec.evaluation.screening is None:
        return []
    if len(rows) < planned or any(r["status"] not in ("DONE", "ERROR") for r in rows):
        say("screening: the sweep stopped before all its trials ended; the full protocol runs when it is resumed")
        return []
    done = [r for r in rows if r["status"] == "DONE"]
    objectives = tuple(spec.selection.objectives)
    chosen = contenders(done, objectives)  # rows rebuilt from Tune's results: their screening numbers
    todo = [r for r in chosen if read_full_record(train_storage, r["trial_id"]) is None]
    say(f"screening: {len(chosen)} of {len(done)} trials can still reach the front or the champion rule "
        f"({', '.join(r['trial_id'] for r in chosen) or 'none'}); the full protocol runs for {len(todo)} of them, "
        f"the others keep their screening numbers")
    failed: list[str] = []
    for start in range(0, len(todo), max(1, concurrency)):  # as many at once as trials ran at once
        batch = todo[start:start + max(1, concurrency)]
        futures = [_fit_remote.remote(spec, train_storage, r) for r in batch]
        failed += [r["trial_id"] for r, future in zip(batch, futures) if not _succeeded(r["trial_id"], future)]
    for r in apply_stored_records(spec, train_storage, chosen):
        _log_full(tracker, r)
    for r in rows:  # the sweep is not complete without them: FAILED, and `isosweep resume` evaluates them again
        if r["trial_id"] in failed:
            r["status"] = "ERROR"
    return failed


def _succeeded(trial_id: str, future) -> bool:
    """The outcome of one `_fit_remote`; a task that died (its process killed, out of memory) is a failure, said."""
    try:
        return bool(ray.get(future))
    except ray.exceptions.RayError as exc:
        say(f"screening: the full evaluation of {trial_id} died ({type(exc).__name__}: {str(exc)[:300]}); "
            "`isosweep resume` runs it again")
        return False


@ray.remote(num_cpus=0)
def _fit_remote(spec: SweepSpec, train_storage: str, row: dict) -> bool:
    """Runs `_evaluate_in_full` in its own process, as Tune runs a trial, so several run at once."""
    return _evaluate_in_full(spec, train_storage, row)


def _evaluate_in_full(spec: SweepSpec, train_storage: str, row: dict) -> bool:
    """One trial's full evaluation as a TorchTrainer run of the trial's worker count; False (said) when it failed."""
    trial_id = row["trial_id"]
    checkpoint = st.join(train_storage, trial_id, st.name_of(row["checkpoint_path"]))
    res = spec.resources
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    trainer = TorchTrainer(
        _evaluate_per_worker,
        train_loop_config={"spec": spec.to_dict(), "checkpoint": checkpoint, "out": full_eval_uri(train_storage, trial_id)},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=res.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{trial_id}-full-eval", storage_path=_local_path(train_storage),
                             failure_config=FailureConfig(max_failures=spec.search.max_failures, max_preemption_failures=-1),
                             logging_config=LoggingConfig(log_level=os.environ.get("ISOSWEEP_TRAIN_LOG_LEVEL", "WARNING"))),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 -- reported: the row stays at screening fidelity, the sweep says so
        error = exc
    if error is not None:
        say(f"screening: the full evaluation of {trial_id} failed ({type(error).__name__}: {str(error)[:300]}); "
            "`isosweep resume` runs it again")
        return False
    say(f"screening: {trial_id} evaluated in full in {time.time() - t0:.0f} s")
    return True


def _local_path(uri: str) -> str:
    return uri if st.is_remote(uri) else str(Path(uri).expanduser().resolve())


def _evaluate_per_worker(config: dict[str, Any]) -> None:
    """Every rank: the trial's final model from storage (manifest checked, safetensors only), FID and PPL (the
    metrics screening changes; the others were measured at full size already) at the full protocol over this rank's
    shard; rank 0 writes the record."""
    spec = SweepSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    with tempfile.TemporaryDirectory(prefix="isosweep-full-eval-") as tmp:
        local = st.download_dir(config["checkpoint"], Path(tmp) / "checkpoint")
        verify_checkpoint(local, config["checkpoint"])
        base = load_local_base(local, None)
    evaluate = trial_evaluator(spec, full=True, metrics=["fid", "ppl"])  # what screening measured at other sizes
    codec = base.codec.to(device) if base.codec is not None else None
    result = evaluate(base.unet.to(device), base.scheduler, device, rank, world, codec=codec)
    if rank == 0:
        st.write_json(config["out"], {"metrics": result.metrics, "backbones": result.backbones, "timings": result.timings,
                                      "settings": result.settings, "finished": time.time()})
    if world > 1:
        torch.distributed.barrier()


def _log_full(tracker: Tracker | None, row: dict) -> None:
    """The full numbers on the trial's MLflow run (`fid`, `ppl`, ... replace the screening ones, which stay as
    `screen_*`); best effort: storage holds the record, and the tables are made from it."""
    run_id = row.get("mlflow_run_id")
    if tracker is None or not run_id:
        return
    values = {k: v for k, v in row.items() if (k in SCREENED_VALUES or k.startswith(("screen_", "cost_full_")))
              and isinstance(v, float) and math.isfinite(v)}
    tracker.best_effort(f"logging the full evaluation of {row['trial_id']} to MLflow", "the sweep's tables have it",
                        tracker.log_final_metrics, run_id, values, tags={"isosweep.fidelity": "full"})
