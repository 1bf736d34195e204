"""`isosweep sync TARGET`: upload to MLflow what a sweep's storage holds and the tracking server lacks."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from isosweep import storage as st
from isosweep.console import result
from isosweep.constants import EXIT_COMPLETED
from isosweep.redact import REDACTED, scrub_text
from isosweep.results.layout import find_sweeps, is_sweep, read_state, sweep_dirs
from isosweep.spec import SpecError, SweepSpec, load_spec, spec_from_dict
from isosweep.tracking.sync import is_sync_metadata
from isosweep.tracking.tracker import Tracker


def sync_command(args: argparse.Namespace) -> int:
    """`isosweep sync TARGET [--storage S] [--tracking-uri U]`: upload what storage has and MLflow lacks.

    TARGET: a sweep's folder or URI (s3:// included), a spec file (every sweep of its name under
    --storage or its storage), or a spec name with --storage. Of a remote sweep, the records (JSON, evaluation
    folders) are copied into a temporary folder, removed after; a checkpoint's weights only for a run that lacks them. The tracking URI: --tracking-uri, the spec,
    MLFLOW_TRACKING_URI, the one recorded in the sweep's state file, then the local default.
    """
    total = synced = 0
    for where, spec, spec_path in _sweeps(args):
        recorded = (read_state(where).get("tracking_uri") if is_sweep(where) else None)
        candidates = (args.tracking_uri, spec.tracking.uri, os.environ.get("MLFLOW_TRACKING_URI"), recorded)
        explicit = next((u for u in candidates if u and REDACTED not in u), None)
        if explicit is None and recorded:  # scrubbed credentials: the recorded URI cannot be used
            raise SpecError(f"{scrub_text(where)}: the sweep's tracking URI carried credentials, which are never stored "
                            f"(saved as {recorded}); fix: pass --tracking-uri URI or set MLFLOW_TRACKING_URI")
        tracker = Tracker(explicit) if explicit else Tracker.resolve(None, None, st.parent_of(where))
        if st.is_remote(where):
            with tempfile.TemporaryDirectory(prefix="isosweep-sync-") as tmp:
                result(f"{st.name_of(where)}: copying the records of {scrub_text(where)} to a temporary folder")
                local = st.download_dir(where, Path(tmp) / st.name_of(where), keep=is_sync_metadata)
                done = tracker.sync_sweep_dir(spec, spec_path, local, st.parent_of(where), remote=where)
        else:
            done = tracker.sync_sweep_dir(spec, spec_path, where, st.parent_of(where))
        for tid, run_id, uploaded in done:
            result(f"{st.name_of(where)}/{tid}\trun {run_id}\t" + (", ".join(uploaded) if uploaded else "up to date"))
        total += len(done)
        synced += sum(1 for *_, u in done if u)
        result(f"{st.name_of(where)}: {len(done)} trial(s) checked against {scrub_text(tracker.uri)}")
    result(f"synced {synced} of {total} trial(s)")
    return EXIT_COMPLETED


def _sweeps(args: argparse.Namespace) -> list[tuple[str, SweepSpec, str | None]]:
    """(sweep location, spec, spec path) for each sweep the target names."""
    target = args.target
    if is_sweep(target):
        where = st.normalize(target)
        return [(where, spec_from_dict(read_state(where)["spec"], source=f"{target} (saved spec)", check_paths=False), None)]
    if Path(target).is_file():
        spec = load_spec(target, getattr(args, "overrides", None), check_paths=False)
        root = st.normalize(args.storage or spec.storage.path)
        if st.is_remote(root):
            found = find_sweeps(root, spec.name)
        else:  # local folders without a state file too (a sweep whose driver died before writing one)
            found = [str(d) for d in sweep_dirs(root, spec.name)]
        if not found:
            raise SpecError(f"{target}: no sweep folder {spec.name} or {spec.name}-* under {scrub_text(root)}; fix: check --storage and the spec's name")
        return [(w, spec, target) for w in found]
    if not args.storage:
        raise SpecError(f"{target}: not a sweep folder or URI and not a spec file; fix: pass the sweep's URI, a spec file, or a name with --storage")
    found = find_sweeps(st.normalize(args.storage), target)
    if not found:
        raise SpecError(f"{target}: no sweep named '{target}-*' under {scrub_text(args.storage)}; fix: check --storage and the name")
    return [(w, spec_from_dict(read_state(w)["spec"], source=f"{w} (saved spec)", check_paths=False), None) for w in found]

