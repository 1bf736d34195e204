"""Take the screenshots of README "Watching a sweep" from a real sweep: docs/img/watching/*.png.

    nice -n 15 .venv/bin/python -m docs.screenshots                 # about 15 min on a busy shared 2-core CPU
    .venv/bin/python -m docs.screenshots --keep /tmp/shots           # keep the run (sweep, MLflow db, logs) there

What it starts, all on 127.0.0.1 with free ports, each in its own process group, and stops at the end by
PID (never `ray stop`, never by name):
- a one-node Ray cluster with its dashboard, its own --temp-dir and no auth token (tests/support/ray_cluster.py);
- Prometheus (Debian's `prometheus`) with clusters/monitoring/prometheus.yml pointed at that cluster's
  service-discovery file and a 1 s scrape interval (tests/support/prometheus_server.py);
- `mlflow server` with a SQLite store and local artifacts;
- the demo sweep, shortened (`--set` below), on that cluster by address and tracked in that server;
- after the sweep, `optuna-dashboard` on the sweep's `optuna.journal`.

It writes, over the previous ones: ray_actors.png (taken while trials train), ray_jobs.png, prometheus_sweep.png,
prometheus_trials.png, mlflow_trial_metrics.png, mlflow_sweep_run.png, mlflow_registry.png, optuna_study.png.

Screenshots come from headless Chromium (Debian's `chromium`: apt-get install -y --no-install-recommends
chromium); a screenshot that comes out (almost) one colour is taken again with a longer virtual-time budget.
Grafana is not packaged by Debian or on PyPI, so the Grafana dashboard's isosweep queries are shown in
Prometheus's own graph page instead. optuna-dashboard is found on PATH, in .venv, or given by
--optuna-dashboard (pip install optuna-dashboard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.support.prometheus_server import prometheus_binary, start_prometheus
from tests.support.ray_cluster import start_local_cluster, stop_local_cluster
from tests.support.servers import free_port, start_process, stop_process, wait_http

REPO = Path(__file__).resolve().parents[1]

OUT = REPO / "docs" / "img" / "watching"
BIN = Path(sys.executable).parent
# the demo spec, shorter: 20 training steps instead of 40 (the evaluation stays the demo's), one trial at a time
# (about 2 GB of memory instead of 4, on a machine shared with other jobs), and a retry for a trial that Ray's
# memory monitor kills when the machine runs short
OVERRIDES = ["train.max_steps=20", "train.checkpoint_every=10", "search.max_concurrent_trials=1", "search.max_failures=2"]
MAX_BYTES = 300_000
# The MLflow UI opens its Assistant side panel (a third of the window) only when the page's host name is
# localhost or 127.0.0.1: Chromium reaches the loopback server under this name instead (the server is told to
# accept it), so the screenshots show the runs at full width.
MLFLOW_HOST = "mlflow.local"


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium: apt-get install -y --no-install-recommends chromium")


def shoot(url: str, name: str, work: Path, size: tuple[int, int] = (1440, 900), budget_ms: int = 15000,
          crop_height: int | None = None) -> Path:
    """Screenshot `url` into OUT/name.png; retried with a longer budget when it comes out blank."""
    from PIL import Image, ImageStat

    out = OUT / f"{name}.png"
    img = None
    for attempt, budget in enumerate((budget_ms, budget_ms * 2, budget_ms * 4)):
        raw = work / f"{name}.raw.png"
        raw.unlink(missing_ok=True)
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={work / 'chromium'}", "--force-device-scale-factor=1",
               f"--host-resolver-rules=MAP {MLFLOW_HOST} 127.0.0.1",
               f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget}", f"--screenshot={raw}", url]
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        if not raw.exists():
            continue
        img = Image.open(raw).convert("RGB")
        if crop_height:
            img = img.crop((0, 0, img.width, min(img.height, crop_height)))
        spread = max(ImageStat.Stat(img.convert("L")).stddev[0], 0.0)
        if spread > 12 or attempt == 2:  # a page with content; a blank or spinner-only page is ~one colour
            break
        print(f"  {name}: looks blank (stddev {spread:.1f}), again with {budget * 2} ms", flush=True)
    if img is None:
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    img.save(out, optimize=True)
    if out.stat().st_size > MAX_BYTES:  # a palette of 256 colours keeps text sharp at a fraction of the size
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    if out.stat().st_size > MAX_BYTES:
        scale = (MAX_BYTES / out.stat().st_size) ** 0.5
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS)
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"  wrote {out.relative_to(REPO)} ({out.stat().st_size // 1024} KB)", flush=True)
    return out


def prometheus_graph_url(base: str, exprs: list[str], range_min: int, end: float) -> str:
    """Prometheus 2.x's graph page with one graph panel per expression, over range_min minutes up to `end` (UTC)."""
    params = {}
    end_input = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(end))
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.stacked": "0", f"g{i}.show_exemplars": "0",
                       f"g{i}.range_input": f"{range_min}m", f"g{i}.end_input": end_input,
                       f"g{i}.moment_input": end_input})
    return f"{base}/graph?{urllib.parse.urlencode(params)}"


def prometheus_shots(url: str, started: float, ended: float, work: Path) -> None:
    """Two graph pages (two panels each fit a 1440x1560 window without scrolling): the sweep, and its trials."""
    minutes = int((ended - started) / 60) + 2
    shoot(prometheus_graph_url(url, [
        "max by (state) (ray_isosweep_sweep_trials)",
        "min by (objective) (ray_isosweep_sweep_best)",
    ], minutes, ended + 30), "prometheus_sweep", work, size=(1440, 1560))
    shoot(prometheus_graph_url(url, [
        "max by (trial) (ray_isosweep_train_step)",
        "sum by (trial, metric) (ray_isosweep_eval_samples_done) / sum by (trial, metric) (ray_isosweep_eval_samples_planned)",
    ], minutes, ended + 30), "prometheus_trials", work, size=(1440, 1560))


def optuna_dashboard_binary(arg: str | None) -> str:
    for cand in (arg, shutil.which("optuna-dashboard"), str(BIN / "optuna-dashboard")):
        if cand and os.access(cand, os.X_OK):
            return cand
    sys.exit("no optuna-dashboard: pip install optuna-dashboard (or pass --optuna-dashboard PATH)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="run in this folder and keep it (default: a temp folder, removed at the end)")
    ap.add_argument("--optuna-dashboard", help="the optuna-dashboard executable")
    ap.add_argument("--set", action="append", default=[], help="more spec overrides for the sweep")
    args = ap.parse_args()
    od_bin = optuna_dashboard_binary(args.optuna_dashboard)
    chromium()
    if not prometheus_binary():
        sys.exit("no prometheus: apt-get install -y --no-install-recommends prometheus")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="isosweep-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    procs: list = []
    cluster = None
    try:
        print(f"work folder: {work}", flush=True)
        cluster = start_local_cluster(worker_nodes=0, head_cpus=2, auth=False)
        dash = cluster.dashboard_url
        print(f"Ray: {cluster.address}, dashboard {dash}", flush=True)

        port = port_mlflow = free_port()
        mlflow_uri = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = work / "mlflow-server.log"
        mlflow = start_process([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                         "--artifacts-destination", str(work / "mlartifacts"), "--host", "127.0.0.1",
                         "--port", str(port), "--workers", "1",
                         "--allowed-hosts", f"{MLFLOW_HOST}:{port},127.0.0.1:{port},localhost:{port}",
                         "--cors-allowed-origins", f"http://{MLFLOW_HOST}:{port}"], env, log)
        procs.append(mlflow)
        wait_http(f"{mlflow_uri}/health", mlflow, log, 180)
        print(f"MLflow: {mlflow_uri}", flush=True)

        sd_file = cluster.temp_dir / "prom_metrics_service_discovery.json"
        with start_prometheus(sd_file, work / "prometheus") as prom:
            print(f"Prometheus: {prom.url}", flush=True)
            storage = work / "runs"
            cmd = [str(BIN / "isosweep"), "run", str(REPO / "search_spaces" / "demo.yaml"), "--address", cluster.address,
                   "--tracking-uri", mlflow_uri, "--storage", str(storage)]
            for o in OVERRIDES + args.set:
                cmd += ["--set", o]
            started = time.time()
            with open(work / "sweep.log", "wb") as fh:
                sweep = subprocess.Popen(cmd, env={**cluster.env, "PYTHONUNBUFFERED": "1"}, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(sweep)
            print(f"sweep started, log {work / 'sweep.log'}", flush=True)
            # while trials train: the Ray dashboard's live views
            live = False
            while sweep.poll() is None:
                running = prom.query('max(ray_isosweep_sweep_trials{state="running"})')
                if not live and running and float(running[0]["value"][1]) >= 1:
                    time.sleep(30)  # let the trials' Train workers start
                    print("trials running: the Ray dashboard", flush=True)
                    shoot(f"{dash}/#/actors", "ray_actors", work, size=(1440, 1170))
                    live = True
                time.sleep(5)
            if sweep.returncode != 0:
                sys.exit(f"the sweep failed ({sweep.returncode}): {(work / 'sweep.log').read_text()[-3000:]}")
            print(f"sweep done in {time.time() - started:.0f} s", flush=True)
            time.sleep(12)  # the driver's last values reach Prometheus
            shoot(f"{dash}/#/jobs", "ray_jobs", work, size=(1440, 540))

            prometheus_shots(prom.url, started, time.time(), work)

        # MLflow UI: a searched trial's step curves, the sweep's run with its Pareto plot, the registered model
        ui = f"http://{MLFLOW_HOST}:{port_mlflow}"
        exp = get_json(f"{mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo")["experiment"]
        eid = exp["experiment_id"]
        req = urllib.request.Request(f"{mlflow_uri}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [eid], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = json.loads(r.read())["runs"]
        tags = [({t["key"]: t["value"] for t in r["data"].get("tags", [])},
                 {p["key"]: p["value"] for p in r["data"].get("params", [])}, r["info"]["run_id"]) for r in runs]
        (parent,) = [rid for t, _, rid in tags if t.get("isosweep.role") == "sweep"]
        searched = sorted((t["isosweep.trial_id"], rid) for t, p, rid in tags
                          if t.get("isosweep.role") == "trial" and p.get("baseline") == "False")
        shoot(f"{ui}/#/experiments/{eid}/runs/{searched[0][1]}/model-metrics", "mlflow_trial_metrics", work,
              size=(1440, 1000), budget_ms=30000)
        shoot(f"{ui}/#/experiments/{eid}/runs/{parent}/artifacts/results/pareto.png", "mlflow_sweep_run", work,
              size=(1440, 820), budget_ms=30000)
        shoot(f"{ui}/#/models/isodiff-demo", "mlflow_registry", work, size=(1440, 640), budget_ms=30000)

        # Optuna dashboard on the sweep's journal
        (journal,) = storage.glob("demo-*/optuna.journal")
        port = free_port()
        log = work / "optuna-dashboard.log"
        od = start_process([od_bin, str(journal), "--host", "127.0.0.1", "--port", str(port)], dict(os.environ), log)
        procs.append(od)
        od_url = f"http://127.0.0.1:{port}"
        wait_http(f"{od_url}/api/studies", od, log, 60)
        sid = get_json(f"{od_url}/api/studies")["study_summaries"][0]["study_id"]
        shoot(f"{od_url}/dashboard/studies/{sid}", "optuna_study", work, size=(1440, 2100), budget_ms=30000)
        print(f"done: {sorted(p.name for p in OUT.glob('*.png'))}", flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if hasattr(p, "_isosweep_log"):
                    stop_process(p)
                else:  # the sweep: Ctrl-C first (it saves and exits), then its group
                    p.send_signal(2)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, 9)
                        p.wait()
            elif hasattr(p, "_isosweep_log"):
                stop_process(p)
        if cluster is not None:
            stop_local_cluster(cluster)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
