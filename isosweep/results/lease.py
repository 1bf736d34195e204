"""One driver per sweep: a lease file in the sweep's folder that the driver holding it keeps fresh.

Two drivers on one sweep would both write its experiment state, checkpoints, Optuna journal and `@champion`.
`isosweep run` takes the lease of the new sweep before anything is written; `isosweep resume` takes it only when
no live driver holds it. A lease is live while its holder renews it (every `ISOSWEEP_LEASE_HEARTBEAT_S`, default
15 s, from a thread); it is stale, and taken over, when its last renewal is older than `ISOSWEEP_LEASE_STALE_S`
(default 120 s), or at once when its holder was a process of this machine that has exited (a killed driver).
The driver removes it when it ends, however it ends.

On a local or shared disk taking a lease is atomic. On an object store (no conditional write) a driver writes the
lease, waits `SETTLE_S` and reads it back: of two drivers racing, only the one whose write stayed goes on; and a
holder that finds another's token at a renewal stops its sweep.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from isosweep import storage as st
from isosweep.console import warn
from isosweep.constants import EXIT_SWEEP_BUSY
from isosweep.redact import scrub_text
from isosweep.results.layout import LEASE_FILE
from isosweep.spec import SpecError

SETTLE_S = 2.0  # object stores: how long a driver waits before reading its lease back (storage.claim_file)


class SweepBusy(SpecError):
    """Another driver holds the sweep's lease (refused before anything ran; exit code EXIT_SWEEP_BUSY)."""

    exit_code = EXIT_SWEEP_BUSY


def stale_after_s() -> float:
    return float(os.environ.get("ISOSWEEP_LEASE_STALE_S", "120"))


def heartbeat_s() -> float:
    return float(os.environ.get("ISOSWEEP_LEASE_HEARTBEAT_S", "15"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(held: dict | None) -> str | None:
    """Why a lease (the JSON read back; None: unreadable) may be taken over, or None while its holder is live."""
    if not isinstance(held, dict) or not isinstance(held.get("heartbeat"), (int, float)):
        return "its lease file is unreadable"
    age = time.time() - held["heartbeat"]
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
        return f"its driver (pid {held['pid']} on this machine) has exited"
    if age > stale_after_s():
        return f"its driver was last heard {age:.0f} s ago (stale after {stale_after_s():.0f} s)"
    return None


def holder_text(held: dict) -> str:
    age = time.time() - float(held.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
    return (f"pid {held.get('pid')} on host {held.get('host')} ({held.get('command', 'a driver')}, started {started}, "
            f"last heard {age:.0f} s ago)")


@dataclass
class DriverLease:
    """The lease this process holds on one sweep (`acquire` takes it, `release` gives it back)."""

    uri: str  # the lease file
    data: bytes  # what this process last wrote there
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, lease_uri: str, command: str) -> DriverLease:
        """Take a sweep's lease (its file: `layout.lease_uri`) for `command` ("run", "resume"); SweepBusy when a
        live driver holds it."""
        now = time.time()
        record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                  "command": f"isosweep {command}", "started": now, "heartbeat": now}
        lease = cls(lease_uri, json.dumps(record, indent=2).encode())
        held = st.claim_file(lease_uri, lease.data, _may_take, SETTLE_S)
        if held is not None:
            raise _busy(lease_uri, _parse(held))
        return lease

    @property
    def token(self) -> str:
        """This lease's own id (a driver's lease file holds its holder's)."""
        return json.loads(self.data)["token"]

    def renew(self) -> bool:
        """Refresh the heartbeat; False when the lease is no longer this process's (another driver took it)."""
        held = _parse(st.read_bytes(self.uri))
        if held is not None and held.get("token") != self.token:
            return False
        self.data = json.dumps({**json.loads(self.data), "heartbeat": time.time()}, indent=2).encode()
        st.write_bytes(self.uri, self.data)
        return True

    def keep_fresh(self, on_lost: Callable[[str], None]) -> None:
        """Renew from a daemon thread until `release`; `on_lost(message)` once if another driver takes the lease.
        A renewal that fails (storage down) is said once and tried again at the next beat."""
        def beat() -> None:
            failing = False
            while not self._stop.wait(heartbeat_s()):
                try:
                    mine = self.renew()
                    failing = False
                except Exception as exc:  # noqa: BLE001 - storage down: the sweep goes on, the next beat retries
                    if not failing:
                        warn(f"could not renew the sweep's lease in storage ({scrub_text(str(exc))[:200]}); "
                             f"retrying every {heartbeat_s():.0f} s")
                    failing = True
                    continue
                if not mine:
                    on_lost(f"another driver took this sweep's lease ({scrub_text(self.uri)}); stopping this one")
                    return

        self._thread = threading.Thread(target=beat, name="isosweep-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this process's, and the sweep's folder with it if nothing
        else was written there (a new sweep refused before it started). Never raises: storage may be down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            st.remove_if_same(self.uri, self.data)
        except Exception as exc:  # noqa: BLE001 - the next driver takes a stale lease over
            warn(f"could not remove the sweep's lease ({scrub_text(str(exc))[:200]}); the next `isosweep resume` takes it "
                 f"over once it is {stale_after_s():.0f} s old")


def _parse(data: bytes | None) -> dict | None:
    """A lease's JSON, or None when it is unreadable (cut off, not an object)."""
    try:
        value = json.loads(data or b"")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _may_take(data: bytes | None) -> bool:
    reason = stale_reason(_parse(data))
    if reason is not None:
        warn(f"taking over a sweep's lease: {reason}")
    return reason is not None


def _busy(lease_uri: str, held: dict | None) -> SweepBusy:
    who = holder_text(held) if held else "one whose lease was written at the same moment"
    return SweepBusy(f"{lease_uri}: another driver is running this sweep: {who}; fix: stop it first "  # the CLI scrubs it
                     f"(Ctrl-C, or `ray job stop` for a submitted sweep), or, if it is gone, run this again once its lease "
                     f"is {stale_after_s():.0f} s old (ISOSWEEP_LEASE_STALE_S)")


def read_lease(sweep_uri: str) -> dict | None:
    """The lease in a sweep's folder as its holder wrote it (host, pid, command, started, heartbeat), or None when
    there is none or it is unreadable."""
    return _parse(st.read_bytes(st.join(sweep_uri, LEASE_FILE)))


def refuse_if_held(sweep_uri: str) -> None:
    """SweepBusy when a live driver holds the sweep: the quick check `resume` makes before its heavy imports (the
    driver's `DriverLease.acquire` is the one that counts)."""
    uri = st.join(sweep_uri, LEASE_FILE)
    held = _parse(st.read_bytes(uri))
    if held is not None and stale_reason(held) is None:
        raise _busy(uri, held)
