"""Where a sweep's records live: folder names, the state file, the done marker, and finding sweeps.

    <storage>/<sweep id>/              the Tune experiment (sweep id = <spec name>-<YYYYmmdd-HHMMSS>)
        isosweep_sweep.json            the sweep's state: spec, storage, tracking URI, parent run id
        sweep_done.json                written once the sweep has finished
        results.csv, results.md        the results table; pareto.png
        report/                        report.md, report.html and figures
        train/<trial id>/checkpoint_*  each trial's Train run and checkpoints

For `s3://` storage the small files (state, tables, report) live under ./runs/<sweep id> on the driver.
"""

from __future__ import annotations

import time
from pathlib import Path

from isosweep.config import SweepSpec

STATE_FILE = "isosweep_sweep.json"
DONE_MARKER = "sweep_done.json"
TRAIN_DIR = "train"  # <sweep>/train/<trial id>/: a trial's Train run is named after its Tune trial id
LOCAL_ROOT_FOR_REMOTE = "runs"


def is_remote(path: str) -> bool:
    """A URI (s3://...) rather than a local path."""
    return "://" in path


def resolve_storage(spec: SweepSpec, cli_storage: str | None) -> str:
    """Absolute local path or a URI (s3://...) where Tune keeps the sweep."""
    path = cli_storage or spec.storage.path
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def new_sweep_id(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def local_root(storage: str) -> Path:
    """The local folder that holds the sweeps' small files: the storage itself, or ./runs for remote storage."""
    return Path(storage) if not is_remote(storage) else Path(LOCAL_ROOT_FOR_REMOTE).resolve()


def default_report_dir(storage: str, sweep_id: str) -> Path:
    return local_root(storage) / sweep_id / "report"


def local_state_dir(storage: str, sweep_id: str) -> Path:
    """Where the driver keeps its own small files (state, tables); local even for s3 storage."""
    d = local_root(storage) / sweep_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def find_sweeps(storage: str, name: str) -> list[Path]:
    """Local sweep directories of a spec name, newest first."""
    root = local_root(storage)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{name}-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def train_storage(storage: str, sweep_id: str) -> str:
    """Where the trials' Train runs and checkpoints go: <storage>/<sweep id>/train."""
    return f"{experiment_path(storage, sweep_id)}/{TRAIN_DIR}" if is_remote(storage) else str(Path(storage) / sweep_id / TRAIN_DIR)


def experiment_path(storage: str, sweep_id: str) -> str:
    """The Tune experiment of a sweep: <storage>/<sweep id>."""
    return f"{storage.rstrip('/')}/{sweep_id}"


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
