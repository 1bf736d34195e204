"""A sweep's results as rows: one flat dict per trial, the outcome of a sweep, and its roles.

A row holds the trial's parameters (`spec.TRIAL_KEYS`, the `spec.POINT_KEYS` its point set, and `baseline`), its status, every value of
`spec.RESULT_METRICS` (NaN when missing: interval bounds and PPL quantiles are missing from sweeps older
than them), MCN/VoR at further timesteps (`mcn_t100`, `vor_t100_lo`, ... when evaluated), `backbone_<metric>` names, `selected_step` and `selected_fid_cheap`
(NaN unless evaluation.checkpoint_fid selected the step), the checkpoint path and the MLflow run id. Every table, plot, report and registry description is made from rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isosweep.core.names import SELECTED_FID, SELECTED_STEP
from isosweep.results.pareto import Choice, choose_champion, pareto_front
from isosweep.spec import POINT_KEYS, RESULT_METRICS, SweepSpec, is_result_metric


@dataclass
class SweepOutcome:
    """What a finished (or inspected) sweep left: its rows, the Pareto front and the champion."""

    sweep_id: str
    sweep_dir: Path
    rows: list[dict]
    front: list[dict]
    champion: Choice | None
    report_dir: Path | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    registered: dict = field(default_factory=dict)
    sweep_uri: str = ""  # where the sweep lives in storage (sweep_dir is the local folder its files were written in)
    state: Any = None  # results.states.SweepState once the run returned
    promotion: str = ""  # why the champion was not promoted ("" when it was, or may be)


def make_row(trial_id: str, config: dict, metrics: dict, status: str) -> dict:
    """One flat table row: the trial's parameters, status, metrics, backbones and where its model is."""
    row = {
        "trial_id": trial_id,
        "baseline": bool(config.get("baseline", False)),
        "lambda_iso": float(config.get("lambda_iso", math.nan)),
        "p": float(config.get("p", math.nan)),
        "iso_metric": config.get("iso_metric", config.get("metric", "")),  # `metric` before the rename
        **{k: config[k] for k in POINT_KEYS if config.get(k) is not None},  # set by a point of search.points
        "status": "DONE" if metrics.get("evaluated") else status,
    }
    for k in RESULT_METRICS:
        v = metrics.get(k)
        row[k] = float(v) if isinstance(v, (int, float)) else math.nan
    row.update({k: float(v) for k, v in metrics.items()  # MCN/VoR at further timesteps: names from the spec
                if k not in RESULT_METRICS and is_result_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)})
    row.update({k: v for k, v in metrics.items() if k.startswith("backbone_")})
    for k in (SELECTED_STEP, SELECTED_FID):  # the step whose weights the row measures (evaluation.checkpoint_fid)
        row[k] = float(metrics[k]) if isinstance(metrics.get(k), (int, float)) else math.nan
    # evaluation.screening: `screen` until the full protocol ran (`full`, with the screened values kept beside it)
    row["fidelity"] = str(metrics.get("fidelity") or "full")
    row.update({k: float(v) for k, v in metrics.items() if k.startswith(("screen_", "cost_")) and isinstance(v, (int, float))})
    row["checkpoint_path"] = metrics.get("checkpoint_path", "")
    row["mlflow_run_id"] = metrics.get("mlflow_run_id", "")
    row["tracking_pending"] = bool(metrics.get("tracking_pending"))  # MLflow lacks some of it: `isosweep sync`
    return row


def label_rows(rows: list[dict], front: list[dict], champion: Choice | None) -> None:
    """Set each row's `role`: baseline, champion and/or pareto joined by '+', else '-'."""
    front_ids = {r["trial_id"] for r in front}
    champ = champion.row["trial_id"] if champion else None
    for r in rows:
        roles = []
        if r["baseline"]:
            roles.append("baseline")
        if r["trial_id"] == champ:
            roles.append("champion")
        if r["trial_id"] in front_ids:
            roles.append("pareto")
        r["role"] = "+".join(roles) or "-"


def summarize(spec: SweepSpec, rows: list[dict]) -> tuple[list[dict], Choice | None]:
    """The Pareto front and champion of the DONE rows by the spec's selection rule; labels every row. Rows measured
    only at screening fidelity (evaluation.screening) are never on the front nor champion: FID and PPL at other
    sizes are other numbers, and the screening left out just the rows that could not reach either."""
    done = [r for r in rows if r["status"] == "DONE" and r.get("fidelity", "full") != "screen"]
    objectives = tuple(spec.selection.objectives)
    front = pareto_front(done, objectives)
    champion = choose_champion(
        done, spec.selection.rule, objectives, spec.selection.fid_tolerance, spec.selection.weights
    )
    label_rows(rows, front, champion)
    return front, champion


