"""Real S3 and MLflow servers on loopback for tests: moto's standalone S3 server and `mlflow server`.

A plain module (not conftest.py), imported like tests/support/ray_cluster.py:

    # the fixtures are registered in conftest.py: a test just names them

    def test_artifacts_in_s3(mlflow_server):
        uri = mlflow_server.uri                      # http://127.0.0.1:PORT, artifacts proxied to S3
        keys = mlflow_server.s3.keys("mlflow/")      # what landed in the bucket, listed with boto3

Both fixtures are session-scoped (the MLflow server takes ~9 s and 0.5 GB to start with job
execution off); tests isolate themselves by experiment/registry names. Ports are picked free on
127.0.0.1; each server runs in its own process group and is stopped by that group's id (its PID) at
the end, never by name. Credentials are dummies and exist only in the server's environment and in
`S3Server.env`; clients of the tracking server need only its URI because it proxies artifacts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .ray_cluster import free_port  # noqa: F401 -- one definition; tests import it from either module

BIN = Path(sys.executable).parent
BUCKET = "isosweep-test"
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-not-real",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_process(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc._isosweep_log = log  # type: ignore[attr-defined]
    return proc


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group this fixture started (pgid == its PID), SIGKILL after grace_s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    # uvicorn workers of `mlflow server` share the group; make sure none outlive the parent
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc._isosweep_log.close()  # type: ignore[attr-defined]


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout_s}s; log:\n{log_path.read_text()[-3000:]}")


@dataclass
class S3Server:
    """A moto S3 server: endpoint, bucket, and the environment a boto3/MLflow S3 client needs."""

    endpoint_url: str
    bucket: str
    pid: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def fetched(self) -> list[str]:
        """The object keys read so far (each GET of an object the server logged, whole or a range), in order."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path else []
        prefix = f"/{self.bucket}/"
        found = (re.search(r'GET (/\S+) HTTP/[\d.]+\S*" 20[06] ', line) for line in lines)  # 206: a ranged read
        paths = (urllib.parse.urlsplit(m.group(1)).path for m in found if m)
        return [urllib.parse.unquote(p[len(prefix):]) for p in paths if p.startswith(prefix) and len(p) > len(prefix)]

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"], region_name=DUMMY_AWS["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket (paginated listing)."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


@dataclass
class MlflowServer:
    """`mlflow server` with a SQLite backend and artifacts proxied to `s3://<bucket>/mlflow`."""

    uri: str
    pid: int
    s3: S3Server
    artifacts_destination: str
    workdir: Path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto_server on a free loopback port with an empty bucket; stopped by PID at the end."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="isosweep-s3-"))
    env = {**os.environ, **DUMMY_AWS}
    log_path = workdir / "moto.log"
    proc = start_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env, log_path)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", proc, log_path, 30)
        server = S3Server(endpoint, BUCKET, proc.pid, env={**DUMMY_AWS, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint},
                          log_path=log_path)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server) -> Iterator[MlflowServer]:
    """`mlflow server` (SQLite in a temp dir, --artifacts-destination s3://bucket/mlflow) on a free port.

    The server holds the S3 endpoint and dummy credentials (MLFLOW_S3_ENDPOINT_URL, AWS_*); job
    execution is off (9 s / 0.5 GB instead of 16 s / 2.3 GB). Waits for /health; stopped by PID.
    """
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="isosweep-mlflow-"))
    dest = f"s3://{s3_server.bucket}/mlflow"
    env = {**os.environ, **s3_server.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = workdir / "mlflow-server.log"
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", dest,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    proc = start_process(cmd, env, log_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, log_path, 120)
        yield MlflowServer(uri, proc.pid, s3_server, dest, workdir)
    finally:
        stop_process(proc)


class LosingProxy:
    """An HTTP proxy on loopback in front of the real tracking server, for injecting network faults.

    It forwards every request but: for the first `lose` requests whose path ends with one of `paths`,
    drops the connection instead of returning the server's answer (the request took effect, its
    response was lost); while `down` is set, answers 503 without forwarding (an outage); while `status` is set,
    answers that status with `body` without forwarding (a gateway refusing an expired token: 401). `trigger`:
    (when(method, path, body) -> bool, then(body)), fired once, on the first request `when` matches, before that
    request is answered; `after` lists every request from then on ("METHOD path")."""

    def __init__(self, target: str, paths: tuple[str, ...] = (), lose: int = 0):
        import http.server
        import threading
        import urllib.request

        proxy = self
        self.lost: list[str] = []
        self.down = threading.Event()
        self.refused = 0
        self.status: int | None = None
        self.body = b"Unauthorized: the token has expired"
        self.trigger = None
        self.after: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                trigger = proxy.trigger
                if trigger is not None and trigger[0](self.command, self.path, body):
                    proxy.trigger = None
                    trigger[1](body)
                    proxy.after.append(f"{self.command} {self.path}")
                elif proxy.after:
                    proxy.after.append(f"{self.command} {self.path}")
                if proxy.status is not None:
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(proxy.body)))
                    self.end_headers()
                    self.wfile.write(proxy.body)
                    return
                if proxy.down.is_set():
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(target + self.path, data=body if self.command != "GET" else None,
                                             method=self.command, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, headers, data = r.status, r.headers.items(), r.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers.items(), e.read()
                if paths and self.path.split("?")[0].endswith(paths) and len(proxy.lost) < lose:
                    proxy.lost.append(self.path)
                    self.close_connection = True
                    self.connection.shutdown(2)  # the server did it; the client never hears
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class StoppableTcpProxy:
    """A TCP forwarder on loopback in front of a real server, which can be stopped like the server itself.

    `stop()` closes the listening socket and every open connection (clients see resets, then refused
    connections); `start()` listens again on the same port. `stop_on(when, nth, down_s)` stops it when a
    client sends the nth request line (b"PUT /bucket/key HTTP/1.1") for which `when(line)` is true,
    before forwarding that request, and starts it again down_s seconds later: a server that dies
    mid-upload."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.stops: list[str] = []  # the request line that triggered each stop
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._trigger: tuple | None = None
        self._matches = 0
        self._listener: socket.socket | None = None
        self.start()

    def start(self) -> None:
        import threading

        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            srv, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if srv is not None:
            srv.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def stop_on(self, when, nth: int, down_s: float) -> None:
        self._trigger, self._matches = (when, nth, down_s), 0

    def close(self) -> None:
        self._trigger = None
        self.stop()

    def _accept(self, srv: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        import re
        import threading

        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self._trigger is not None:
                    when, nth, down_s = self._trigger
                    for line in re.findall(rb"^[A-Z]+ \S+ HTTP/1\.[01]", data, flags=re.M):
                        if when(line):
                            self._matches += 1
                            if self._matches == nth:
                                self._trigger = None
                                self.stops.append(line.decode(errors="replace"))
                                self.stop()
                                threading.Timer(down_s, self.start).start()
                                return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
