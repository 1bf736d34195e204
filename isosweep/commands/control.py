"""`isosweep stop`: a running sweep stopped gracefully, its driver found by the lease in the sweep's folder."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import time

from isosweep import storage as st
from isosweep.commands.sweep import _find_sweep
from isosweep.console import note, result
from isosweep.constants import EXIT_COMPLETED, EXIT_ERROR, EXIT_NOT_RUNNING
from isosweep.redact import scrub_text
from isosweep.results.layout import read_state
from isosweep.results.lease import holder_text, read_lease
from isosweep.results.summary import driver_of
from isosweep.spec import SpecError


def stop_command(args: argparse.Namespace) -> int:
    """`isosweep stop TARGET [--wait S]`: SIGTERM to the sweep's driver when it runs on this machine (the driver stops
    as on Ctrl-C: state INTERRUPTED, resumable, exit 143); for a driver elsewhere, one line naming its host and the
    command that stops it there. EXIT_NOT_RUNNING when no live driver holds the sweep."""
    sweep = _starting_sweep(args.target) or _find_sweep(args.target, args.storage, [], unfinished=False)
    where = shlex.quote(scrub_text(sweep))
    held = driver_of(sweep)
    if held is None:
        note(f"nothing to stop: no driver is running sweep {st.name_of(sweep)} (state {_recorded(sweep)})")
        return EXIT_NOT_RUNNING
    pid, host = held.get("pid"), held.get("host")
    if host != socket.gethostname() or not isinstance(pid, int):
        note(f"error: the driver of {st.name_of(sweep)} runs on host {host} (pid {pid}), not this one; fix: run "
             f"`isosweep stop {where}` on {host}, or, for a sweep submitted as a Ray job, `ray job stop JOB_ID --address "
             f"http://HEAD:8265` (`ray job list` names it isosweep-NAME-YYYYmmdd-HHMMSS-XXXX)")
        return EXIT_ERROR
    os.kill(pid, signal.SIGTERM)  # the driver's CLI takes it as Ctrl-C: Tune's graceful stop, trials saved, resumable
    note(f"sent SIGTERM to the driver of {st.name_of(sweep)}: {holder_text(held)}")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and _same_driver(sweep, held):
        time.sleep(0.5)
    if _same_driver(sweep, held):
        if args.wait:
            note(f"the driver is still stopping after {args.wait:g} s (its trials save their state first); "
                 f"`isosweep stop {where}` again sends a second SIGTERM, which stops it as a second Ctrl-C would")
        return EXIT_COMPLETED if not args.wait else EXIT_ERROR
    result(f"stopped sweep {st.name_of(sweep)}: state {_recorded(sweep)}; continue it with: isosweep resume {where}")
    return EXIT_COMPLETED


def _starting_sweep(target: str) -> str | None:
    """A sweep folder or URI whose driver holds its lease but has not written the state file yet (it is preparing or
    waiting for its tracking server): `stop` may stop it; the other verbs need the state file."""
    try:
        sweep = st.normalize(target)
        return sweep if read_lease(sweep) is not None else None
    except (OSError, ValueError):  # a spec file, a name: not a folder
        return None


def _recorded(sweep: str) -> str:
    """The status the sweep's state file records, or what stands in for it before the driver wrote one."""
    try:
        return read_state(sweep).get("status") or "?"
    except SpecError:
        return "not recorded yet (the driver had not started the sweep's tracking run)"


def _same_driver(sweep: str, held: dict) -> bool:
    """Whether the driver that was signalled still holds the sweep's lease (it removes the lease when it ends)."""
    now = read_lease(sweep)
    if now is None or now.get("token") != held.get("token"):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
