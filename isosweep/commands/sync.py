"""`isosweep sync SPEC`: upload to MLflow what a sweep's storage holds and the tracking server lacks."""

from __future__ import annotations

import argparse
import os

from isosweep.config import load_spec
from isosweep.files import read_json
from isosweep.results.layout import STATE_FILE, sweep_dirs
from isosweep.tracking.client import resolve_tracking_uri
from isosweep.tracking.redact import scrub_text
from isosweep.tracking.sync import sync_sweep_dir


def sync_command(args: argparse.Namespace) -> int:
    """`isosweep sync SPEC [--storage S] [--tracking-uri U]`: upload what storage has and MLflow lacks.

    Walks `<storage>/<name>` and `<storage>/<name>-*` (local storage; for s3:// storage, copy the
    sweep folder down first). The tracking URI: --tracking-uri, the spec, MLFLOW_TRACKING_URI, the
    one recorded in the sweep's state file, then the local default.
    """
    spec = load_spec(args.spec, getattr(args, "overrides", None), check_paths=False)
    storage = args.storage or spec.storage.path
    if "://" in storage:
        raise NotImplementedError(
            f"sync reads local storage only (got {scrub_text(storage)}); copy the sweep folder down first, e.g. "
            f"`aws s3 sync {scrub_text(storage.split('?')[0])}/<sweep id> ./runs/<sweep id>`, then pass --storage ./runs"
        )
    dirs = sweep_dirs(storage, spec.name)
    if not dirs:
        raise FileNotFoundError(f"no sweep folder {spec.name} or {spec.name}-* under {storage}; check --storage and the spec's name")
    total = synced = 0
    for d in dirs:
        recorded = read_json(d / STATE_FILE).get("tracking_uri")
        explicit = args.tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded
        uri = explicit or resolve_tracking_uri(None, None, storage)
        done = sync_sweep_dir(spec, args.spec, uri, d, storage)
        for tid, run_id, uploaded in done:
            print(f"{d.name}/{tid}\trun {run_id}\t" + (", ".join(uploaded) if uploaded else "up to date"))
        total += len(done)
        synced += sum(1 for *_, u in done if u)
        print(f"{d.name}: {len(done)} trial(s) checked against {scrub_text(uri)}")
    print(f"synced {synced} of {total} trial(s)")
    return 0

