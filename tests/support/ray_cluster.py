"""A real multi-node Ray cluster on loopback for tests: `ray start --head` plus `ray start --address`.

A plain module (not conftest.py) so any test module can import it:

    # the fixture `ray_cluster` is registered in conftest.py: a test just names it

    def test_sweep_by_address(ray_cluster):
        c = ray_cluster
        subprocess.run([..., "isosweep", "run", spec, "--address", c.address], env=c.env, check=True)

Why it is built the way it is:
- Other people's Ray clusters run on the same machine, and `ray stop` stops every Ray process it finds
  by name. So each node is started with `ray start --block` in its own process group, every port is
  picked free on 127.0.0.1, each cluster has its own `--temp-dir`, and teardown kills only the process
  trees of the nodes started here, by PID. Nothing here ever runs `ray stop`.
- Ray 2.60 enforces token auth when `RAY_AUTH_MODE=token`; without the variable, `ray start` turns it
  on by itself when `~/.ray/auth_token` exists. The mode is therefore always set explicitly, and the
  token travels in `RAY_AUTH_TOKEN` (never written to `~/.ray`), so clients need `cluster.env`.
- `--node-ip-address=127.0.0.1` is passed, but Ray 2.60 replaces a loopback address by the machine's
  primary IP (`services.resolve_ip_for_localhost`), so nodes register under that IP; the GCS listens on
  all interfaces, and `127.0.0.1:PORT` works as the client address.
- Cost here (2 shared cores): 12-40 s to start both nodes, about 5 s to stop them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The `ray` executable of the interpreter running the tests (the project's .venv), not one on PATH.
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@dataclass
class LocalRayCluster:
    """Handles of a running loopback cluster; `env` is what a client process needs to reach it."""

    address: str  # GCS address for `ray.init(address=...)` / `isosweep run --address`, e.g. 127.0.0.1:40123
    dashboard_url: str  # http://127.0.0.1:PORT, for the Jobs API and `isosweep submit --address` ("" if none)
    token: str | None  # the auth token, or None when auth is disabled
    temp_dir: Path
    env: dict[str, str]  # os.environ plus RAY_AUTH_MODE/RAY_AUTH_TOKEN and the venv's bin on PATH
    num_nodes: int
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    logs: list[Path] = field(default_factory=list, repr=False)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of each node's `ray start` output, for assertion messages."""
        out = []
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(out)


def _node_env(auth_token: str | None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra_env or {})}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    if auth_token:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = auth_token
    else:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN", None)
    # job entrypoints (`python -m isosweep.cli ...`, `isosweep ...`) must find the venv's interpreter
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")
    try:
        # own session: its process group is ours alone, so teardown can never touch other clusters
        return subprocess.Popen([RAY_BIN, "start", "--block", *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def _alive_nodes(cluster: LocalRayCluster) -> int:
    """Alive nodes as the GCS reports them: the dashboard's state API when there is a dashboard
    (milliseconds), else `ray.nodes()` from a subprocess (seconds; keeps this process Ray-free)."""
    if cluster.dashboard_url:
        import requests

        headers = {"Authorization": f"Bearer {cluster.token}"} if cluster.token else {}
        try:
            r = requests.get(f"{cluster.dashboard_url}/api/v0/nodes", headers=headers, timeout=5)
            rows = r.json()["data"]["result"]["result"]
            return sum(1 for n in rows if n.get("state") == "ALIVE")
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return 0
    code = (
        "import ray\n"
        f"ray.init(address={cluster.address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print('NODES', sum(1 for n in ray.nodes() if n['Alive']))\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: not known to be alive yet; the caller's deadline decides
        return 0
    for line in r.stdout.splitlines():
        if line.startswith("NODES "):
            return int(line.split()[1])
    return 0


def _wait_alive(cluster: LocalRayCluster, count: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `count` nodes are alive (True), or until `proc` exits (False: the caller may retry it)."""
    while _alive_nodes(cluster) < count:
        if proc.poll() is not None:
            return False
        for other in cluster.procs:
            if other is not proc and other.poll() is not None:
                raise RuntimeError(f"a node exited with code {other.returncode}\n{cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} nodes not alive in time\n{cluster.log_tail()}")
        time.sleep(0.5)
    return True


def _wait_port(port: int, proc: subprocess.Popen, deadline: float, what: str, cluster: LocalRayCluster) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}\n{cluster.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not open 127.0.0.1:{port} in time\n{cluster.log_tail()}")


def _wait_dashboard(url: str, token: str | None, proc: subprocess.Popen, deadline: float, cluster: LocalRayCluster) -> None:
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"head exited with code {proc.returncode}\n{cluster.log_tail()}")
        try:
            r = requests.get(f"{url}/api/version", headers=headers, timeout=2)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"dashboard {url} did not answer in time\n{cluster.log_tail()}")


def start_local_cluster(
    worker_nodes: int = 1,
    head_cpus: int = 2,
    worker_cpus: int = 1,
    auth: bool = True,
    include_dashboard: bool = True,
    timeout_s: float = 120.0,
    worker_resources: dict[str, float] | None = None,
    extra_env: dict[str, str] | None = None,
) -> LocalRayCluster:
    """Start a head (and `worker_nodes` more nodes) on 127.0.0.1; returns once all nodes are alive.

    worker_resources: custom resources each worker node declares (`ray start --resources`); extra_env:
    variables every node's processes get (e.g. the S3 credentials a cloud node has from its role).
    Call `stop_local_cluster` in a `finally`; the fixture below does.
    """
    token = secrets.token_hex(16) if auth else None
    env = _node_env(token, extra_env)
    # short path: Ray's unix sockets live under the temp dir and have a ~107-byte limit
    temp_dir = Path(tempfile.mkdtemp(prefix="isr", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    cluster = LocalRayCluster(
        address=f"127.0.0.1:{gcs_port}", dashboard_url=f"http://127.0.0.1:{dash_port}" if include_dashboard else "",
        token=token,
        temp_dir=temp_dir, env=env, num_nodes=1 + worker_nodes,
    )
    deadline = time.monotonic() + timeout_s
    try:
        node_ports = _free_ports(6)
        head_args = [
            "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--num-cpus={head_cpus}", "--num-gpus=0", "--disable-usage-stats",
            f"--include-dashboard={'true' if include_dashboard else 'false'}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={node_ports[0]}", f"--node-manager-port={node_ports[1]}",
            f"--object-manager-port={node_ports[2]}", f"--dashboard-agent-listen-port={node_ports[3]}",
            f"--dashboard-agent-grpc-port={node_ports[4]}", f"--metrics-export-port={node_ports[5]}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        log = temp_dir / "head.out"
        cluster.logs.append(log)
        head = _start_node(head_args, env, log)
        cluster.procs.append(head)
        _wait_port(gcs_port, head, deadline, "head GCS", cluster)
        if include_dashboard:
            _wait_dashboard(cluster.dashboard_url, token, head, deadline, cluster)
        # one worker node at a time, each alive before the next starts: three raylets starting together on
        # two busy cores can miss the GCS's registration deadline ("The current node timed out during startup")
        for i in range(worker_nodes):
            for attempt in range(2):
                p = _free_ports(6)
                # each node its own temp dir, as each machine of a real cluster has its own disk: nodes sharing one
                # session folder share one runtime-env cache, whose agents then delete each other's working dirs
                worker_temp = temp_dir / f"w{i}{attempt}"
                worker_temp.mkdir(exist_ok=True)
                worker_args = [
                    f"--address={cluster.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={worker_cpus}",
                    f"--temp-dir={worker_temp}",
                    "--num-gpus=0", "--disable-usage-stats",
                    f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                    f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                    f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
                ]
                if worker_resources:
                    worker_args.append(f"--resources={json.dumps(worker_resources)}")
                log = temp_dir / f"worker{i}-{attempt}.out"
                cluster.logs.append(log)
                proc = _start_node(worker_args, env, log)
                cluster.procs.append(proc)
                if _wait_alive(cluster, 2 + i, proc, deadline):
                    break
                cluster.procs.remove(proc)  # it exited: its log stays in cluster.logs, and it is tried once more
            else:
                raise RuntimeError(f"worker node {i} failed to start twice\n{cluster.log_tail()}")
        if not _wait_alive(cluster, 1 + worker_nodes, head, deadline):
            raise RuntimeError(f"the head exited with code {head.returncode}\n{cluster.log_tail()}")
    except BaseException:
        stop_local_cluster(cluster)
        raise
    return cluster


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, command line) from /proc (Linux; no psutil in the venv)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        table[int(entry)] = (int(fields[1]), int(fields[2]), cmd)
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    kids = {p for p, (ppid, _, _) in table.items() if ppid == pid}
    for k in list(kids):
        kids |= _descendants(k, table)
    return kids


def stop_local_cluster(cluster: LocalRayCluster, grace_s: float = 15.0) -> None:
    """Stop exactly the processes this cluster started, by PID; never `ray stop` (it is machine-wide).

    SIGTERM to a blocking `ray start` makes it shut its own node down (about 3 s here); workers go
    first, then the head. Whatever survives the grace period is SIGKILLed: the descendants of our
    `ray start` processes, members of their process groups (each node has its own session), and any
    process whose command line names this cluster's unique temp dir.
    """
    before = _proc_table()
    ours = {p.pid for p in cluster.procs}
    for pid in list(ours):
        ours |= _descendants(pid, before)
    for proc in reversed(cluster.procs):  # workers before the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in reversed(cluster.procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    groups = {p.pid for p in cluster.procs}  # start_new_session: pgid == the ray start pid
    marker = str(cluster.temp_dir)
    now = _proc_table()
    leftovers = {
        pid for pid, (_, pgid, cmd) in now.items()
        # a PID of ours counts only if it is still the same program (PIDs get reused)
        if (pid in ours and before.get(pid, (0, 0, ""))[2] == cmd) or pgid in groups or marker in cmd
    } - {os.getpid()}
    for pid in sorted(leftovers):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in cluster.procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def kill_worker_node(cluster: LocalRayCluster, index: int = 0) -> None:
    """SIGKILL one worker node (`index` among the workers) and every process of it: a machine lost at once."""
    proc = [p for p in cluster.procs[1:] if p.poll() is None][index]
    table = _proc_table()
    victims = {proc.pid} | _descendants(proc.pid, table) | {pid for pid, (_, pgid, _) in table.items() if pgid == proc.pid}
    for pid in sorted(victims):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=10)


def node_ids(cluster: LocalRayCluster) -> dict[str, list[str]]:
    """{"head": [id], "workers": [ids]}: the alive nodes' Ray node ids, from the dashboard's state API."""
    import requests

    headers = {"Authorization": f"Bearer {cluster.token}"} if cluster.token else {}
    rows = requests.get(f"{cluster.dashboard_url}/api/v0/nodes", headers=headers, timeout=10).json()["data"]["result"]["result"]
    alive = [n for n in rows if n.get("state") == "ALIVE"]
    return {"head": [n["node_id"] for n in alive if n.get("is_head_node")],
            "workers": [n["node_id"] for n in alive if not n.get("is_head_node")]}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """One multi-node cluster for the whole session, shaped like a real one: a head with the dashboard and
    no CPUs for trials, plus two worker nodes of one CPU each, token auth on, all on loopback.

    A trial of two 1-CPU workers must put one rank on each worker node. Yields a `LocalRayCluster`:
    `.address` (GCS, for `--address`), `.dashboard_url` (Jobs API), `.token`, and `.env` (pass it to client
    subprocesses: it carries RAY_AUTH_MODE/RAY_AUTH_TOKEN). Jobs' drivers run on the head (they need no CPU).
    Every process reports its Ray metrics every 2 s instead of 10 s, so that the Prometheus of
    test_sweep.py sees the gauges of a tiny trial's seconds-long evaluation.
    """
    cluster = start_local_cluster(worker_nodes=2, head_cpus=0, worker_cpus=1, auth=True,
                                  extra_env={"RAY_metrics_report_interval_ms": "2000"})
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)
