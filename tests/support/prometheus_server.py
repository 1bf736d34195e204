"""A real Prometheus server for tests, scraping a Ray cluster with the shipped config; and the shipped
Grafana dashboard's queries.

A plain module imported like tests/support/ray_cluster.py:

    from support.prometheus_server import dashboard_queries, prometheus_binary, start_prometheus

    with start_prometheus(sd_file, tmp_path) as prom:   # clusters/monitoring/prometheus.yml, pointed at sd_file
        ...                                             # run something on the Ray cluster
        prom.query('max_over_time(ray_isosweep_sweep_trials{state="done"}[10m])')

The binary is Debian's `prometheus` package (`make test` installs it as root when it is missing). The
server runs in its own process group on a free loopback port with its data under the test's tmp_path, and
is stopped by its PID, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .ray_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "clusters" / "monitoring"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana-isosweep.json"


def prometheus_binary() -> str | None:
    """The `prometheus` executable: on PATH, else Debian's /usr/bin/prometheus; None when neither exists."""
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel (rows included), and of every query variable."""
    dash = json.loads(path.read_text())
    out = []

    def walk(panels):
        for p in panels:
            out.extend((p.get("title", ""), t["expr"]) for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def label_values_selector(query: str) -> str | None:
    """The series selector of a Grafana `label_values(selector, label)` variable query, else None."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
    return m.group(1) if m else None


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's result: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        return self._get("/api/v1/query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._get("/api/v1/query_range", query=promql, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def scrape_config_for(sd_file: Path, scrape_interval: str = "1s") -> dict:
    """The shipped scrape config with only two changes: the service-discovery file of this cluster (its own
    --temp-dir, not /tmp/ray) and a scrape interval short enough for a sweep of a few minutes."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    return config



@contextlib.contextmanager
def start_prometheus(sd_file: Path, workdir: Path, timeout_s: float = 60.0) -> Iterator[Prometheus]:
    """Run Prometheus with `scrape_config_for(sd_file)` until the block ends."""
    binary = prometheus_binary()
    assert binary, "no prometheus binary"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(sd_file)))
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {proc.returncode}\n{prom.log_tail()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready in {timeout_s} s\n{prom.log_tail()}")
            time.sleep(0.5)
        yield prom
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is this server alone
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
