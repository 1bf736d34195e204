"""Full-protocol records of screened trials (evaluation.screening): where each lives and how it changes a row.

A screened sweep evaluates its contenders again at the full protocol (`sweep.full_eval`) and stores one JSON record
per trial at `<train storage>/<trial id>/isosweep_full_eval.json`. The full-evaluation phase and every reader of a sweep
(`results.readback.read_sweep`: `isosweep results/status/promote`) put those records into the rows the same way, here,
without importing Ray or torch. (`tracking.sync` reads the same file to log its values to MLflow.)
"""

from __future__ import annotations

import math

from isosweep import storage as st
from isosweep.results.layout import FULL_EVAL_FILE, SCREENED_VALUES
from isosweep.spec import SweepSpec


def full_eval_uri(train_storage: str, trial_id: str) -> str:
    """Where a trial's full-protocol record is stored."""
    return st.join(train_storage, trial_id, FULL_EVAL_FILE)


def read_full_record(train_storage: str, trial_id: str) -> dict | None:
    """A trial's stored full-protocol record, or None when it has none yet."""
    uri = full_eval_uri(train_storage, trial_id)
    return st.read_json(uri)


def apply_stored_records(spec: SweepSpec, train_storage: str, rows: list[dict]) -> list[dict]:
    """Put every stored full-protocol record into its screened row (`apply_full_record`); returns those rows.
    A sweep read back from storage (`isosweep results`, `promote`) shows exactly what its run decided."""
    if spec.evaluation.screening is None:
        return []
    updated = []
    for r in rows:
        record = read_full_record(train_storage, r["trial_id"]) if r["status"] == "DONE" else None
        if record is not None:
            apply_full_record(r, record)
            updated.append(r)
    return updated


def apply_full_record(row: dict, record: dict) -> None:
    """Put a full-protocol record into a screened row: screening values kept as `screen_<name>`, the full ones in
    their place, `fidelity` full, the full evaluation's seconds as `cost_full_<metric>_s`."""
    if row.get("fidelity") == "screen":
        for k in SCREENED_VALUES:
            if k in row:
                row[f"screen_{k}"] = row[k]
    for k in SCREENED_VALUES:
        row[k] = float(record["metrics"].get(k, math.nan))
    row.update({f"cost_full_{k}_s": float(v) for k, v in (record.get("timings") or {}).items()})
    row["fidelity"] = "full"
