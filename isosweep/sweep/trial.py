"""The Tune trial: one TorchTrainer run, its MLflow child run, and the final report Tune selects on.

Tune's function trainable (`make_trial_fn`) opens (or reopens on retry) the trial's child run, runs its
TorchTrainer (named by the Tune trial id, so a restarted trial resumes its own Train run), logs the
final checkpoint and evaluation record to MLflow, and reports the metrics with the trial's parameters.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from ray import tune

from isosweep import storage as st
from isosweep.console import warn
from isosweep.errors import deterministic_cause
from isosweep.evaluation.record import EvalResult, read_record
from isosweep.redact import scrub_text, scrub_tree
from isosweep.results.rows import make_row
from isosweep.spec import SweepSpec, trial_params_of
from isosweep.sweep.callbacks import ForwardToTune
from isosweep.sweep.trainer import build_trainer
from isosweep.tracking.tracker import Tracker
from isosweep.training.best_step import selection_columns


def make_trial_fn(spec_dict: dict, sweep: dict):
    """The Tune function trainable. sweep: {tracking_uri, parent_run_id, train_storage, session, sweep_id, sweep_uri}.

    Tracking never fails the trial: an outage or a refusal (an expired token, a deleted run; said once, after which
    neither this function nor the trial's Train workers call MLflow again) leaves `tracking_pending` set, and the
    sweep's end (or `isosweep sync`) records the trial from storage."""

    def isosweep_trial(config: dict) -> None:
        spec = SweepSpec.model_validate(spec_dict)
        trial_id = tune.get_context().get_trial_id()
        params = trial_params_of(config)
        uri = sweep.get("tracking_uri")
        tracker = Tracker(uri, f"trial {trial_id}", sweep.get("sweep_uri")) if uri else None
        # tracking is off the critical path: a tracking outage leaves the run to `isosweep sync` (the
        # driver runs it at the end), it never turns a trained and evaluated trial into an error
        safe = "its results are safe in storage and `isosweep sync` records them"
        run_id = tracker.best_effort(f"trial {trial_id}: opening its MLflow run", safe, tracker.open_trial_run,
                                     spec.experiment_name, sweep["parent_run_id"], trial_id, params) if tracker else None
        pending = tracker is not None and run_id is None
        def make_trainer():  # the same run name: each attempt resumes the run from its latest checkpoint
            return build_trainer(spec, run_name=trial_id, storage_path=sweep["train_storage"], trial_params=params,
                                 evaluate=True, mlflow={"tracking_uri": uri, "run_id": run_id} if run_id else None,
                                 tracking_uri=uri,  # also without a run: a models:/ base model is looked up there
                                 callbacks=[ForwardToTune(list(spec.selection.objectives))], max_failures=0,
                                 extra_config={"sweep_id": sweep.get("sweep_id", ""),  # tags its Ray metrics
                                               "sweep_uri": scrub_text(sweep.get("sweep_uri") or "")})  # for `isosweep sync`

        started = time.time()
        try:
            result = fit_with_one_budget(make_trainer, trial_id, spec.search.max_failures,
                                         st.join(sweep["train_storage"], trial_id, ATTEMPTS_FILE), sweep.get("session", 0))
            checkpoint = result.checkpoint
            train_metrics = dict(result.metrics or {})
            stopped = train_metrics.pop("tracking_stopped", None)
            if stopped and tracker:  # MLflow refused the run in a worker, which said so: no call from here either
                tracker.stop.stop(stopped, "training", quiet=True)
            if checkpoint is None:
                raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
            with checkpoint.as_directory() as ckpt_dir:
                record = evaluated_record(spec, ckpt_dir, trial_id)
                selected = selection_columns(ckpt_dir)  # the step whose weights these are (evaluation.checkpoint_fid)
                if run_id and tracker.best_effort(f"trial {trial_id}: logging its results", safe, tracker.log_trial_result,
                                                  run_id, ckpt_dir, ok=True) is None:
                    pending = True
            pending = pending or bool(tracker and tracker.stopped)
        except BaseException:
            if run_id:
                tracker.end_run(run_id, "FAILED", quiet=True)
            raise
        if run_id and not pending:
            tracker.end_run(run_id, "FINISHED", quiet=True)
        report = final_report(spec, train_metrics, record, params, checkpoint.path, run_id, selected,
                              seconds=time.time() - started)
        costs = {k: v for k, v in report.items() if k.startswith("cost_")}  # seconds per phase, on the run too (best effort)
        if run_id and not pending and costs:
            tracker.best_effort(f"trial {trial_id}: logging its costs", safe, tracker.log_final_metrics, run_id, costs)
        tune.report({**report, "tracking_pending": pending})

    return isosweep_trial


ATTEMPTS_FILE = "isosweep_attempts.json"  # <train storage>/<trial id>/: the trial's failures, across restarts


class DeterministicTrialError(RuntimeError):
    """A trial failed with an error a retry cannot fix; it is not retried."""

    deterministic = True


def fit_with_one_budget(make_trainer, trial_id: str, budget: int, attempts_uri: str, session: int = 0):
    """`make_trainer().fit()` with infrastructure failures retried under one budget, deterministic ones not.

    Train's own retries are off (the trainer is built with max_failures=0) and Tune's restarts of this
    function count against the same budget: every start and every failed attempt is recorded in
    `attempts_uri` (per `session`, which a `resume` increments, so a resumed sweep gets a fresh budget).
    A deterministic error (`isosweep.errors`) raises DeterministicTrialError at once, naming its cause;
    a restart after one fails at once too. Others wait about 2^n s (x0.5-1.5 jitter, at most a minute)
    and try again, resuming from the latest checkpoint, until the budget is spent.
    """
    record = _read_attempts(attempts_uri, session)
    if record.get("deterministic"):
        raise DeterministicTrialError(record["deterministic"])
    record["starts"] += 1
    error: BaseException | None = None
    while True:
        spent = record["starts"] - 1 + record["failures"]
        if spent > budget:
            _write_attempts(attempts_uri, record)
            raise RuntimeError(f"trial {trial_id}: failure budget spent ({spent} failures, search.max_failures={budget}); "
                               f"last error: {record.get('last_error', 'a restart of the trial')}") from error
        _write_attempts(attempts_uri, record)
        try:
            result = make_trainer().fit()
        except Exception as exc:  # noqa: BLE001 -- Ray Train V2 raises TrainingFailedError; classified below
            error = exc
        else:
            if result.error is None:
                return result
            error = result.error
        cause = deterministic_cause(error)
        if cause is not None:
            record["deterministic"] = scrub_text(f"trial {trial_id} failed with {type(cause).__name__}: {cause}. A retry with "
                                                 "the same inputs fails the same way, so it was not retried; fix the cause, "
                                                 "then `isosweep resume`")
            _write_attempts(attempts_uri, record)
            raise DeterministicTrialError(record["deterministic"]) from error
        record["failures"] += 1
        record["last_error"] = scrub_text(f"{type(error).__name__}: {error}")[:500]  # scrubbed whole, then cut
        if record["starts"] - 1 + record["failures"] <= budget:
            wait = min(60.0, 2.0 ** record["failures"]) * random.uniform(0.5, 1.5)
            warn(f"trial {trial_id}: attempt failed ({record['last_error'][:200]}); retrying in {wait:.0f} s from its latest "
                 f"checkpoint ({record['starts'] - 1 + record['failures']} of {budget} failures allowed)")
            time.sleep(wait)


def _read_attempts(uri: str, session: int) -> dict:
    try:
        record = st.read_json(uri) or {}
    except (OSError, ValueError):
        record = {}
    if record.get("session") != session:
        record = {}
    return {"session": session, "starts": 0, "failures": 0, **record}


def _write_attempts(uri: str, record: dict) -> None:
    """The attempts file, every text in it scrubbed: an error's message may quote a URI with its password."""
    try:
        st.write_json(uri, scrub_tree(record))
    except OSError as exc:  # storage down: the budget then counts this process's attempts only
        warn(f"could not record the trial's attempts at {scrub_text(uri)}: {scrub_text(str(exc))}")


class MissingEvaluation(RuntimeError):
    """A trial's final checkpoint has no evaluation record, or one without the selection's objectives."""


def evaluated_record(spec: SweepSpec, checkpoint_dir, trial_id: str) -> EvalResult:
    """The final checkpoint's evaluation record; raises `MissingEvaluation` when it is missing or lacks an
    objective, so the trial fails (and is never selected) instead of counting as DONE with no numbers."""
    record = read_record(checkpoint_dir)
    missing = [o for o in spec.selection.objectives if record is None or o not in record.metrics]
    if missing:
        where = "no evaluation record (eval/metrics.json)" if record is None else f"no finite {', '.join(missing)}"
        raise MissingEvaluation(
            f"trial {trial_id}: the final checkpoint {checkpoint_dir} has {where}; selection needs "
            f"{' and '.join(spec.selection.objectives)}: keep them in evaluation.metrics, and see the trial's log for the evaluation error")
    return record


def final_report(spec: SweepSpec, train_metrics: dict[str, Any], record: EvalResult, params: dict[str, Any],
                 checkpoint_path: str, run_id: str | None, selected: dict[str, Any] | None = None,
                 seconds: float | None = None) -> dict[str, Any]:
    """What Tune records for a finished trial: its last training report, the evaluation, the parameters,
    where its model is, and `evaluated` (a DONE row); both objectives always present (NaN when missing).
    selected: the final checkpoint's `selected_step`, `selected_fid_cheap` and `backbone_fid_cheap`.
    Costs: `cost_<metric>_s` the final evaluation's seconds per metric (rank 0's), `cost_train_s` the rest of the
    trial's `seconds` (training, checkpoint FIDs, start-up, retries); `fidelity` screen or full (evaluation.screening)."""
    report = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, str, bool))}
    report.update(selected or {})
    report.update(record.metrics)
    report.update({f"backbone_{k}": v for k, v in record.backbones.items()})
    report.update(params)
    report.update({"checkpoint_path": checkpoint_path, "mlflow_run_id": run_id or "", "evaluated": True,
                   "fidelity": record.settings.get("fidelity", "full")})
    report.update({f"cost_{k}_s": float(v) for k, v in record.timings.items()})
    if seconds is not None:
        report["cost_train_s"] = max(0.0, seconds - sum(float(v) for v in record.timings.values()))
    for objective in spec.selection.objectives:
        report.setdefault(objective, float("nan"))
    return report


def rows_from_results(results) -> list[dict]:
    """One row per trial of a finished Tune run (a ResultGrid), baseline first."""
    rows = []
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or _trial_id_of_folder(res.path)
        rows.append(make_row(trial_id, dict(res.config or {}), m, "ERROR" if res.error else "INCOMPLETE"))
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    return rows


def _trial_id_of_folder(path: str | None) -> str:
    """The Tune trial id in a trial folder's name (`<trainable>_<id>_<n>_<params>_<date>`; ids are `719dc20c`
    from a searcher, `abcde_00000` from Tune's own generator), for trials that ended before reporting
    anything; the folder name itself when it has no such id."""
    name = (path or "").rstrip("/").split("/")[-1]
    found = re.search(r"_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_\d+(?:_|$)", name)
    return found.group(1) if found else name
