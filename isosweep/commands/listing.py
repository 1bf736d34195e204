"""`isosweep list`: the sweeps under a storage, one line each, read from isosweep's own files in their folders (state
file, results.csv, done marker, the driver's lease). It imports neither Ray nor the sweep readers, so it starts quickly."""

from __future__ import annotations

import argparse

from isosweep import storage as st
from isosweep.console import note, result, result_json
from isosweep.constants import EXIT_COMPLETED, STORAGE_ENV
from isosweep.redact import scrub_text
from isosweep.results.summary import summarize, summary_table, sweeps_under
from isosweep.spec import SpecError, planned_trials


def list_command(args: argparse.Namespace) -> int:
    """`isosweep list [--storage URI] [--json]`: every sweep under the storage, newest first."""
    if not args.storage:
        raise SpecError(f"list: no storage given; fix: pass --storage URI (a folder or s3://BUCKET/PREFIX) or set {STORAGE_ENV}")
    root = st.normalize(args.storage)
    sweeps = sorted((summarize(s, planned_trials) for s in sweeps_under(root)),
                    key=lambda s: (s["started"] or 0, s["sweep_id"]), reverse=True)
    if args.json:
        result_json({"storage": scrub_text(root), "sweeps": sweeps})
    elif sweeps:
        result(summary_table(sweeps))
    else:
        note(f"no sweeps under {scrub_text(root)} (no folder there holds a sweep's state file)")
    return EXIT_COMPLETED
