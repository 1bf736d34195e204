"""A sweep read back from storage: its rows, front and champion, from any machine, running or finished.

Apart from the driver so that `isosweep results`, `status` and `promote` need Tune's experiment reader and
nothing that trains or evaluates (they start in about 3 s instead of 14: no torch, MLflow or feature networks).
"""

from __future__ import annotations

from pathlib import Path

from ray.tune import ExperimentAnalysis

from isosweep import storage as st
from isosweep.results.full_eval_records import apply_stored_records
from isosweep.results.layout import read_state, train_storage
from isosweep.results.rows import SweepOutcome, make_row, summarize
from isosweep.spec import SweepSpec


def read_sweep(sweep: str | Path) -> tuple[SweepSpec, SweepOutcome]:
    """Rebuild a sweep's rows from its folder in storage (running or finished), from any machine."""
    sweep = st.normalize(sweep)
    state = read_state(sweep)
    spec = SweepSpec.model_validate(state["spec"])
    try:
        trials = ExperimentAnalysis(sweep).trials
    except (FileNotFoundError, ValueError):  # Tune has not saved its experiment state yet: no trial to show
        trials = []
    rows = [make_row(t.trial_id, dict(t.config or {}), dict(t.last_result or {}), t.status) for t in trials]
    rows.sort(key=lambda r: (not r["baseline"], r["trial_id"]))
    apply_stored_records(spec, train_storage(st.parent_of(sweep), state["sweep_id"]), rows)  # evaluation.screening
    front, champion = summarize(spec, rows)
    return spec, SweepOutcome(state["sweep_id"], Path(sweep) if not st.is_remote(sweep) else Path(state["sweep_id"]), rows, front,
                              champion, tracking_uri=state.get("tracking_uri"), parent_run_id=state.get("parent_run_id"),
                              sweep_uri=sweep)
