"""Where a sweep's records live, all under its storage URI (a local folder, a shared file system or S3):

    <storage>/<sweep id>/              the Tune experiment (sweep id = <spec name>-<YYYYmmdd-HHMMSS>-<6 hex>)
        isosweep_driver.lease          the lease of the driver running the sweep (results.lease), while one runs
        isosweep_sweep.json            the sweep's state: the spec as it ran, storage, tracking URI, parent run id
        isosweep_trials.records        every trial's config, last result and status (what `results`/`status` read)
        isosweep_state.seal            the HMACs of Tune's pickled files (results.seal), checked before a resume restores them
        spec.yaml                      the spec as it ran, for people
        sweep_done.json                written once the sweep has finished
        results.csv, results.md        the results table; pareto.png
        report/                        report.md, report.html and figures
        train/<trial id>/checkpoint_*  each trial's Train run and checkpoints

So `status`, `results`, `resume` and `sync` work from any machine that can read the storage URI.
URIs are built with `isosweep.storage.join`, which keeps S3 query strings (`?endpoint_override=...`).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from isosweep import storage as st
from isosweep.spec import SpecError, SweepSpec

STATE_FILE = "isosweep_sweep.json"
LEASE_FILE = "isosweep_driver.lease"  # JSON; not named *.json: Tune copies those back into the folder when it restores
# JSON, written by sweep.callbacks.TrialRecords and read by results.readback; not *.json, as LEASE_FILE
TRIALS_FILE = "isosweep_trials.records"
SPEC_FILE = "spec.yaml"
DONE_MARKER = "sweep_done.json"
TUNER_FILE = "tuner.pkl"  # Tune's, written by Tuner() and unpickled by Tuner.restore (sealed: results.seal)
OWN_JSON = (STATE_FILE, DONE_MARKER)  # isosweep's own *.json at the sweep's top level: read as JSON only, never sealed
TRAIN_DIR = "train"  # <sweep>/train/<trial id>/: a trial's Train run is named after its Tune trial id
REPORT_DIR = "report"
SEAL_FILE = "isosweep_state.seal"  # not *.json: Tune copies those back into the folder when it restores
# <sweep>/train/<trial id>/: the full-protocol record of a screened trial (evaluation.screening; sweep.full_eval)
FULL_EVAL_FILE = "isosweep_full_eval.json"
# the values a full-protocol record replaces in a screened row; the screening ones stay as `screen_<name>`
SCREENED_VALUES = ("fid", "fid_lo", "fid_hi", "ppl", "ppl_lo", "ppl_hi", "ppl_median", "ppl_p90", "ppl_p99")


def resolve_storage(spec: SweepSpec, cli_storage: str | None) -> str:
    """Absolute local path or a URI (s3://...) under which the sweeps live."""
    return st.normalize(cli_storage or spec.storage.path)


def new_sweep_id(spec: SweepSpec) -> str:
    """`<name>-<YYYYmmdd-HHMMSS>-<6 hex>`: two runs of one spec in the same second get different sweeps."""
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def sweep_uri(storage: str, sweep_id: str) -> str:
    """The sweep's folder, which is also its Tune experiment: <storage>/<sweep id>."""
    return st.join(storage, sweep_id)


def lease_uri(storage: str, sweep_id: str) -> str:
    """The sweep's driver lease: <storage>/<sweep id>/isosweep_driver.lease (`results.lease`)."""
    return st.join(storage, sweep_id, LEASE_FILE)


def train_storage(storage: str, sweep_id: str) -> str:
    """Where the trials' Train runs and checkpoints go: <storage>/<sweep id>/train."""
    return st.join(storage, sweep_id, TRAIN_DIR)


def is_sweep(uri: str) -> bool:
    """Whether `uri` (a local folder or a URI) holds a sweep's state file."""
    try:
        return st.exists(st.join(uri, STATE_FILE))
    except (OSError, ValueError):
        return False


def read_state(sweep: str) -> dict:
    """The sweep's state file; a SpecError naming the file and the fix when it is missing or unreadable."""
    where = st.join(sweep, STATE_FILE)
    try:
        state = st.read_json(where)
    except (OSError, ValueError) as exc:
        state, why = None, f"unreadable ({exc.__class__.__name__})"
    else:
        why = "missing"
    if not state or not state.get("sweep_id"):
        why = why if state is None else "without a sweep_id"
        raise SpecError(f"{where}: {why}, so the sweep cannot be read or resumed from it; fix: restore the file "
                        "from a backup, check the storage URI, or start a new sweep with `isosweep run`")
    return state


def is_done(sweep: str) -> bool:
    return st.exists(st.join(sweep, DONE_MARKER))


def find_sweeps(storage: str, name: str) -> list[str]:
    """The sweeps of spec `name` under storage (`<name>-<timestamp>` with a state file), newest first."""
    prefix = f"{name}-"
    found = [st.join(storage, d) for d in st.list_dirs(storage) if d.startswith(prefix) and d[len(prefix):][:1].isdigit()]
    return sorted((s for s in found if is_sweep(s)), key=st.name_of, reverse=True)


def trial_id_from_path(checkpoint_dir: Path, sweep_dir: Path) -> str | None:
    """The trial id in `<sweep>/train/<trial id>/checkpoint_*`, or None when the path is not laid out so."""
    rel = checkpoint_dir.relative_to(sweep_dir).parts
    if TRAIN_DIR in rel[:-1] and rel.index(TRAIN_DIR) + 1 < len(rel) - 1:
        return rel[rel.index(TRAIN_DIR) + 1]
    return None


def sweep_dirs(storage: str, name: str) -> list[Path]:
    """Local folders of the sweeps of spec `name` under storage: `<storage>/<name>` and `<storage>/<name>-*`."""
    root = Path(storage).expanduser()
    cands = [root / name, *sorted(root.glob(f"{name}-*"))]
    return [p for p in cands if p.is_dir()]
