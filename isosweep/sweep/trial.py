"""The Tune trial: one TorchTrainer run, its MLflow child run, and the final report Tune selects on.

Tune's function trainable (`make_trial_fn`) opens (or reopens on retry) the trial's child run, runs its
TorchTrainer (named by the Tune trial id, so a restarted trial resumes its own Train run), logs the
final checkpoint and evaluation record to MLflow, and reports the metrics with the trial's parameters.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from isosweep.config import SweepSpec, trial_params_of
from isosweep.evaluation.record import EvalResult, read_record
from isosweep.results.rows import make_row
from isosweep.sweep.callbacks import ForwardToTune
from isosweep.sweep.trainer import build_trainer
from isosweep.tracking.artifacts import log_trial_result
from isosweep.tracking.runs import end_run, open_trial_run


def make_trial_fn(spec_dict: dict, sweep: dict):
    """The Tune function trainable. sweep: {tracking_uri, parent_run_id, train_storage}."""

    def isosweep_trial(config: dict) -> None:
        spec = SweepSpec.model_validate(spec_dict)
        trial_id = tune.get_context().get_trial_id()
        params = trial_params_of(config)
        uri = sweep.get("tracking_uri")
        run_id = open_trial_run(uri, spec.experiment_name, sweep["parent_run_id"], trial_id, params) if uri else None
        trainer = build_trainer(spec, run_name=trial_id, storage_path=sweep["train_storage"], trial_params=params,
                                evaluate=True, mlflow={"tracking_uri": uri, "run_id": run_id} if run_id else None,
                                callbacks=[ForwardToTune(list(spec.selection.objectives))])
        try:
            result = trainer.fit()
            if result.error:
                raise result.error
            checkpoint = result.checkpoint
            if checkpoint is None:
                raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
            with checkpoint.as_directory() as ckpt_dir:
                record = evaluated_record(spec, ckpt_dir, trial_id)
                if run_id:
                    log_trial_result(uri, run_id, ckpt_dir)
        except BaseException:
            if run_id:
                end_run(uri, run_id, "FAILED", quiet=True)
            raise
        if run_id:
            end_run(uri, run_id, "FINISHED")
        tune.report(final_report(spec, dict(result.metrics or {}), record, params, checkpoint.path, run_id))

    return isosweep_trial


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
                 checkpoint_path: str, run_id: str | None) -> dict[str, Any]:
    """What Tune records for a finished trial: its last training report, the evaluation, the parameters,
    where its model is, and `evaluated` (a DONE row); both objectives always present (NaN when missing)."""
    report = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, str, bool))}
    report.update(record.metrics)
    report.update({f"backbone_{k}": v for k, v in record.backbones.items()})
    report.update(params)
    report.update({"checkpoint_path": checkpoint_path, "mlflow_run_id": run_id or "", "evaluated": True})
    for objective in spec.selection.objectives:
        report.setdefault(objective, float("nan"))
    return report


def rows_from_results(results) -> list[dict]:
    """One row per trial of a finished Tune run (a ResultGrid), baseline first."""
    rows = []
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or (res.path.rstrip("/").split("/")[-1] if res.path else "")
        rows.append(make_row(trial_id, dict(res.config or {}), m, "ERROR" if res.error else "INCOMPLETE"))
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    return rows
