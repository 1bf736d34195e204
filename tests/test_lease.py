"""One driver per sweep (isosweep.results.lease): a live driver's lease refuses a second one, a dead or silent
driver's lease is taken over, a driver whose lease was taken stops, and two runs in one second get two sweeps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isosweep.constants import EXIT_SWEEP_BUSY
from isosweep.results.layout import LEASE_FILE, STATE_FILE, new_sweep_id
from isosweep.results.lease import DriverLease, SweepBusy
from isosweep.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
HOLD = """
import sys, time
from isosweep.results.lease import DriverLease
lease = DriverLease.acquire(sys.argv[1] + "/isosweep_driver.lease", "run")
lease.keep_fresh(on_lost=print)
print("held", flush=True)
time.sleep(600)
"""


def _sweep(tmp_path: Path, sweep_id: str = "demo-20261204-101010-abcdef") -> Path:
    """A sweep folder as `isosweep run` leaves it before its first trial: the state file with the spec."""
    sweep = tmp_path / sweep_id
    sweep.mkdir()
    spec = load_spec(DEMO, check_paths=False)
    (sweep / STATE_FILE).write_text(json.dumps({"sweep_id": sweep_id, "spec": spec.to_dict(), "status": "RUNNING"}))
    return sweep


def _lease(sweep: Path, **fields) -> None:
    now = time.time()
    record = {"token": "theirs", "host": socket.gethostname(), "pid": os.getpid(), "command": "isosweep run",
              "started": now, "heartbeat": now, **fields}
    (sweep / "lease.tmp").write_text(json.dumps(record))
    os.replace(sweep / "lease.tmp", sweep / LEASE_FILE)  # as drivers write it: whole, never half


def test_resume_of_a_sweep_whose_driver_is_alive_is_refused_and_writes_nothing(tmp_path):
    """A real process holds the lease (and renews it); `isosweep resume` of that sweep exits EXIT_SWEEP_BUSY in one
    line naming the holder's pid, host and the fix, and leaves every file of the sweep as it was. Once the holder is
    killed (SIGKILL: its lease stays behind), the next driver of this machine takes the lease over at once."""
    sweep = _sweep(tmp_path)
    env = {**os.environ, "ISOSWEEP_LEASE_HEARTBEAT_S": "0.2", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        first = (sweep / LEASE_FILE).read_text()
        time.sleep(0.6)
        assert (sweep / LEASE_FILE).read_text() != first  # renewed
        before = {p.name: p.read_bytes() for p in sweep.iterdir() if p.name != LEASE_FILE}
        proc = subprocess.run([sys.executable, "-m", "isosweep", "resume", str(sweep)], capture_output=True, text=True,
                              env=env, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == EXIT_SWEEP_BUSY, out
        lines = [line for line in out.splitlines() if "another driver is running this sweep" in line]
        assert len(lines) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in lines[0], out
        assert "Traceback" not in out and "fix: stop it first" in lines[0]
        assert {p.name: p.read_bytes() for p in sweep.iterdir() if p.name != LEASE_FILE} == before
        assert json.loads((sweep / LEASE_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    lease = DriverLease.acquire(str(sweep / LEASE_FILE), "resume")  # its holder exited: no wait for the lease to go stale
    assert json.loads((sweep / LEASE_FILE).read_text())["token"] == lease.token
    lease.release()
    assert not (sweep / LEASE_FILE).exists()


def test_a_silent_drivers_lease_is_taken_over_only_once_stale(tmp_path, monkeypatch):
    """A lease from another machine is live while its heartbeat is fresh, stale after ISOSWEEP_LEASE_STALE_S;
    an unreadable lease is stale."""
    monkeypatch.setenv("ISOSWEEP_LEASE_STALE_S", "60")
    sweep = _sweep(tmp_path)
    _lease(sweep, host="another-node", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(SweepBusy, match=r"pid 1 on host another-node .*last heard 30 s ago"):
        DriverLease.acquire(str(sweep / LEASE_FILE), "resume")
    _lease(sweep, host="another-node", pid=1, heartbeat=time.time() - 61)
    lease = DriverLease.acquire(str(sweep / LEASE_FILE), "resume")
    assert json.loads((sweep / LEASE_FILE).read_text())["token"] == lease.token
    lease.release()
    (sweep / LEASE_FILE).write_text('{"token": "x", "heartb')  # cut off mid-write
    DriverLease.acquire(str(sweep / LEASE_FILE), "resume").release()


def _take(sweep: str, barrier, results) -> None:
    barrier.wait()
    try:
        lease = DriverLease.acquire(sweep + "/" + LEASE_FILE, "run")
        results.put(lease.token)
        time.sleep(1.0)  # hold it (alive) while the others look
    except SweepBusy:
        results.put("busy")


def test_of_drivers_starting_together_exactly_one_gets_the_sweep(tmp_path):
    """Eight driver processes take the lease of one sweep at the same instant, five times over: each time one wins
    and seven are refused, and the lease is the winner's."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        sweep = _sweep(tmp_path, f"demo-20261204-101010-00000{round_}")
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(str(sweep), barrier, results)) for _ in range(8)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        won = [g for g in got if g != "busy"]
        assert len(won) == 1, got
        assert json.loads((sweep / LEASE_FILE).read_text())["token"] == won[0]


def test_a_driver_whose_lease_was_taken_is_told_once(tmp_path, monkeypatch):
    """When a renewal finds another driver's token, the holder's on_lost runs once and renewing stops."""
    monkeypatch.setenv("ISOSWEEP_LEASE_HEARTBEAT_S", "0.05")
    sweep = _sweep(tmp_path)
    lease = DriverLease.acquire(str(sweep / LEASE_FILE), "run")
    lost: list[str] = []
    lease.keep_fresh(on_lost=lost.append)
    time.sleep(0.2)
    assert lost == []
    _lease(sweep, token="theirs", host="another-node")
    deadline = time.monotonic() + 30
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # further beats would tell it again
    assert len(lost) == 1 and "another driver took this sweep's lease" in lost[0]
    lease.release()
    assert json.loads((sweep / LEASE_FILE).read_text())["token"] == "theirs"  # not ours to remove


def test_two_runs_in_one_second_get_two_sweeps_and_a_state_file_must_name_its_folder(tmp_path):
    from isosweep.results.place import SweepPlace

    spec = load_spec(DEMO, check_paths=False)
    assert len({new_sweep_id(spec) for _ in range(50)}) == 50
    sweep = _sweep(tmp_path, "demo-20261204-101010-abcdef")
    planted = tmp_path / "demo-20261204-101010-000000"
    planted.mkdir()
    (planted / STATE_FILE).write_text((sweep / STATE_FILE).read_text())  # a state file copied from another sweep
    with pytest.raises(SpecError, match=r"names sweep 'demo-20261204-101010-abcdef', not this folder's"):
        SweepPlace.open(spec, None, str(planted))


@pytest.mark.slow
def test_a_lease_on_s3(s3_server, monkeypatch):
    """On a real S3 API server: taken (written, read back after the settle time), refused to a second driver while
    live, taken over once stale, removed on release."""
    from isosweep import storage as st

    for k, v in s3_server.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    sweep = (f"s3://{s3_server.bucket}/lease-test/demo-20261204-101010-abcdef"
             f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")
    uri = st.join(sweep, LEASE_FILE)
    lease = DriverLease.acquire(uri, "run")
    assert "lease-test/demo-20261204-101010-abcdef/isosweep_driver.lease" in s3_server.keys("lease-test/")
    with pytest.raises(SweepBusy, match="another driver is running this sweep"):
        DriverLease.acquire(uri, "resume")
    lease.release()
    assert not any(k.endswith(LEASE_FILE) for k in s3_server.keys("lease-test/"))
    st.write_json(st.join(sweep, LEASE_FILE), {"token": "theirs", "host": "another-node", "pid": 1,
                                               "started": 0, "heartbeat": time.time() - 1000})
    taken = DriverLease.acquire(uri, "resume")
    assert json.loads(st.read_bytes(st.join(sweep, LEASE_FILE)))["token"] == taken.token
    taken.release()


def test_a_new_sweeps_folder_holding_only_its_lease_goes_with_it(tmp_path):
    """A new sweep refused before it wrote anything (a multi-node check, a bad address) leaves no folder behind; a
    sweep with its state keeps its folder when the lease goes."""
    new = tmp_path / "demo-20261204-101010-ffffff"
    lease = DriverLease.acquire(str(new / LEASE_FILE), "run")
    assert new.is_dir()
    lease.release()
    assert not new.exists()
    sweep = _sweep(tmp_path)
    DriverLease.acquire(str(sweep / LEASE_FILE), "resume").release()
    assert (sweep / STATE_FILE).is_file() and not (sweep / LEASE_FILE).exists()
