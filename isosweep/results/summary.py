"""One line per sweep, read from isosweep's own files in its folder (the state file, `sweep_done.json`, `results.csv`
and the driver's lease): no Tune experiment is opened, so `isosweep list` reads many sweeps quickly, on local storage
or S3 alike, and nothing read runs code (JSON and CSV only).
"""

from __future__ import annotations

import csv
import io
import time
from typing import Callable

from isosweep import storage as st
from isosweep.redact import scrub_text
from isosweep.results.layout import DONE_MARKER, STATE_FILE, is_sweep
from isosweep.results.lease import read_lease, stale_reason
from isosweep.results.states import RUNNING
from isosweep.spec import SweepSpec

RESULTS_CSV = "results.csv"  # written by results.tables.save_tables into the sweep's folder when the sweep publishes


def sweeps_under(storage: str) -> list[str]:
    """Every sweep folder directly under `storage` (a folder holding a state file), in name order."""
    root = st.normalize(storage)
    return [st.join(root, d) for d in st.list_dirs(root) if is_sweep(st.join(root, d))]


def csv_rows(sweep: str) -> list[dict] | None:
    """The rows of the sweep's results.csv as text, or None when the sweep has not written one yet."""
    data = st.read_bytes(st.join(sweep, RESULTS_CSV))
    return None if data is None else list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))))


def driver_of(sweep: str) -> dict | None:
    """The live driver of a sweep (host, pid, command, started, heartbeat), or None when none holds its lease."""
    held = read_lease(sweep)
    return held if held is not None and stale_reason(held) is None else None


def public(held: dict | None) -> dict | None:
    """What a lease says of its driver for people and scripts (host, pid, command, started, heartbeat), or None."""
    return {k: held.get(k) for k in ("host", "pid", "command", "started", "heartbeat")} if held else None


def summarize(sweep: str, planned_of: Callable[[SweepSpec], int]) -> dict:
    """What `isosweep list` shows of one sweep (the keys of its JSON, docs/cli.md):

    sweep_id, uri (scrubbed), state (the state file's status; RUNNING with no live driver is `RUNNING` with
    `driver` null: the driver was killed before it could record anything), trials_done (the DONE rows of results.csv as
    the sweep last wrote it, at its end or stop; null before its first run has written one), trials_planned
    (`planned_of(spec)`; null when the saved spec no longer validates), champion (trial id or null), started
    (epoch seconds), started_text (local time), driver (live lease holder or null)."""
    state = st.read_json(st.join(sweep, STATE_FILE)) or {}
    done_marker = st.read_json(st.join(sweep, DONE_MARKER))
    try:
        planned: int | None = planned_of(SweepSpec.model_validate(state.get("spec") or {}))
    except Exception:  # noqa: BLE001 - a spec saved by another isosweep version: the count is unknown, the line stays
        planned = None
    rows = csv_rows(sweep)
    done = None if rows is None else sum(1 for r in rows if r.get("status") == "DONE")
    started = state.get("started")
    driver = driver_of(sweep)
    return {"sweep_id": state.get("sweep_id") or st.name_of(sweep), "uri": scrub_text(sweep), "state": state.get("status") or RUNNING,
            "trials_done": done, "trials_planned": planned,
            "champion": (done_marker or {}).get("champion"),
            "started": started, "started_text": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else None,
            "driver": public(driver)}


def summary_table(summaries: list[dict]) -> str:
    """The sweeps as `isosweep list` prints them: one line each (id, state, done/planned, champion, started), in columns."""
    lines = [("SWEEP", "STATE", "TRIALS", "CHAMPION", "STARTED")]
    for s in summaries:
        state = s["state"] + (" (no live driver)" if s["state"] == RUNNING and s["driver"] is None else "")
        done = "?" if s["trials_done"] is None else str(s["trials_done"])
        planned = "?" if s["trials_planned"] is None else str(s["trials_planned"])
        lines.append((s["sweep_id"], state, f"{done}/{planned}", s["champion"] or "none", s["started_text"] or "?"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4] for line in lines)
