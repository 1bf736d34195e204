"""A sweep read back from storage: its rows, front and champion, from any machine, running or finished.

Read from isosweep's own JSON only (the state file, the trial records `sweep.callbacks.TrialRecords` writes, the
full-evaluation records), never from Tune's experiment state: Tune's files embed cloudpickle, and whoever can write
the bucket must not run code on the machine of whoever looks at the sweep. No Ray, torch or MLflow is imported, so
`isosweep results`, `status` and `promote` start in under a second (docs/operations.md, "Threat model").
"""

from __future__ import annotations

from pathlib import Path

from isosweep import storage as st
from isosweep.results.full_eval_records import apply_stored_records
from isosweep.results.layout import TRIALS_FILE, read_state, train_storage
from isosweep.results.rows import SweepOutcome, make_row, summarize
from isosweep.spec import SpecError, SweepSpec


def read_sweep(sweep: str | Path) -> tuple[SweepSpec, SweepOutcome]:
    """Rebuild a sweep's rows from its folder in storage (running or finished), from any machine."""
    sweep = st.normalize(sweep)
    state = read_state(sweep)
    spec = SweepSpec.model_validate(state["spec"])
    rows = [make_row(t["trial_id"], t["config"], t["last_result"], t["status"]) for t in read_trial_records(sweep)]
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    apply_stored_records(spec, train_storage(st.parent_of(sweep), state["sweep_id"]), rows)  # evaluation.screening
    front, champion = summarize(spec, rows)
    return spec, SweepOutcome(state["sweep_id"], Path(sweep) if not st.is_remote(sweep) else Path(state["sweep_id"]), rows, front,
                              champion, tracking_uri=state.get("tracking_uri"), parent_run_id=state.get("parent_run_id"),
                              sweep_uri=sweep)


def read_trial_records(sweep: str) -> list[dict]:
    """The sweep's trial records (`<sweep>/isosweep_trials.records`): each a trial id, its config, its last result and its
    status, as plain JSON values; empty before the first trial starts. A SpecError naming the file when it is corrupt."""
    where = st.join(sweep, TRIALS_FILE)
    try:
        data = st.read_json(where) or {}
        trials = [_checked(t) for t in data.get("trials", [])]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SpecError(f"{where}: unreadable ({exc.__class__.__name__}), so the sweep's trials cannot be shown; fix: restore "
                        "the file from a backup, or `isosweep resume` the sweep, which writes it again") from None
    return trials


def trial_record(trial_id: str, config: dict, last_result: dict, status: str) -> dict:
    """One trial as plain JSON values (what a row is made of): numbers (NaN kept), strings and booleans only."""
    return {"trial_id": str(trial_id), "status": str(status), "config": _plain(config), "last_result": _plain(last_result)}


def _plain(values: dict) -> dict:
    return {str(k): v for k, v in (values or {}).items()
            if v is None or isinstance(v, (bool, int, float, str))}


def _checked(record: dict) -> dict:
    """A record as stored, its types checked (a hand-edited or planted file fails here, naming the file)."""
    if not isinstance(record["trial_id"], str) or not isinstance(record["status"], str):
        raise TypeError("trial_id and status must be strings")
    if not isinstance(record["config"], dict) or not isinstance(record["last_result"], dict):
        raise TypeError("config and last_result must be objects")
    return record
