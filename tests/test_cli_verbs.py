"""`isosweep list`, `isosweep stop` and `--json`: sweeps written by isosweep's own writers (SweepPlace, save_tables, a
real lease holder process), read back by the real CLI in a subprocess, on a local folder and on an S3 API server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from isosweep import storage as st
from isosweep.constants import (EXIT_COMPLETED, EXIT_ERROR, EXIT_NOT_RUNNING, EXIT_SPEC_ERROR, EXIT_TERMINATED,
                                STORAGE_ENV)
from isosweep.results.layout import LEASE_FILE, read_state
from isosweep.results.place import SweepPlace
from isosweep.results.rows import make_row
from isosweep.results.states import COMPLETED, INTERRUPTED, SweepState
from isosweep.results.tables import save_tables
from isosweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
SUMMARY_KEYS = {"sweep_id", "uri", "state", "trials_done", "trials_planned", "champion", "started", "started_text", "driver"}
# a driver as far as the lease and signals go: it holds the sweep's lease, keeps it fresh, and stops on SIGTERM the
# way the CLI makes every command stop (cli._stop_on_sigterm: SIGTERM acts as Ctrl-C, exit 143), releasing the lease
HOLD = """
import sys, time
from isosweep import cli
from isosweep.results.lease import DriverLease
lease = DriverLease.acquire(sys.argv[1] + "/isosweep_driver.lease", "run")
lease.keep_fresh(on_lost=print)
cli._stop_on_sigterm()
print("held", flush=True)
try:
    time.sleep(600)
except KeyboardInterrupt:
    print("got SIGTERM", flush=True)
    lease.release()
    sys.exit(cli._interrupted())
"""


def isosweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isosweep", *map(str, args)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)


def _row(trial_id: str, status: str, baseline: bool = False) -> dict:
    metrics = {"evaluated": True, "fid": 30.0, "ppl": 100.0} if status == "DONE" else {}
    return make_row(trial_id, {"baseline": baseline, "lambda_iso": 0.0 if baseline else 0.1, "p": 0.5, "iso_metric": "sphere"},
                    metrics, status)


def _sweep(storage: str, started: float, *, state: str | None = None, rows: list[dict] | None = None,
           champion: str | None = None) -> str:
    """A sweep as its driver leaves it: the state file (and spec.yaml), then maybe results.csv, a state, the done marker."""
    spec = load_spec(DEMO, check_paths=False)
    place = SweepPlace.open(spec, storage, None)
    place.state["started"] = started
    place.record_start(spec, None, "sqlite:///mlflow.db", "parent-run")
    if rows is not None:
        with tempfile.TemporaryDirectory() as tmp:
            csv_path, _ = save_tables(rows, Path(tmp))
            st.write_bytes(st.join(place.sweep_uri, "results.csv"), csv_path.read_bytes())
    if state is not None:
        place.record_state(SweepState(state))
    if state == COMPLETED:
        place.record_done(champion)
    st.remove_staging(place.staging, place.staging_is_temporary)
    return place.sweep_uri


def _three_sweeps(root: str) -> list[str]:
    """Oldest: completed with a champion; then interrupted with one trial done; newest: just started."""
    done = _sweep(root, 1_000, state=COMPLETED, champion="t2",
                  rows=[_row("t1", "DONE", baseline=True), _row("t2", "DONE"), _row("t3", "DONE"), _row("t4", "DONE")])
    stopped = _sweep(root, 2_000, state=INTERRUPTED, rows=[_row("t1", "DONE", baseline=True), _row("t2", "RUNNING")])
    fresh = _sweep(root, 3_000)
    return [fresh, stopped, done]


def _check_listing(root: str, env: dict | None = None) -> None:
    fresh, stopped, done = (st.name_of(s) for s in _three_sweeps(root))
    proc = isosweep("list", "--storage", root, env=env)
    assert proc.returncode == EXIT_COMPLETED, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["SWEEP", "STATE", "TRIALS", "CHAMPION", "STARTED"] and len(lines) == 4, proc.stdout
    assert [line.split()[0] for line in lines[1:]] == [fresh, stopped, done]  # newest first
    assert lines[1].split()[1:6] == ["RUNNING", "(no", "live", "driver)", "?/4"], lines[1]  # demo: 3 trials + baseline
    assert lines[2].split()[1:4] == ["INTERRUPTED", "1/4", "none"], lines[2]
    assert lines[3].split()[1:4] == ["COMPLETED", "4/4", "t2"], lines[3]

    proc = isosweep("list", "--json", env={STORAGE_ENV: root, **(env or {})})  # the storage from ISOSWEEP_STORAGE
    assert proc.returncode == EXIT_COMPLETED, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is the document alone
    assert set(out) == {"storage", "sweeps"} and [s["sweep_id"] for s in out["sweeps"]] == [fresh, stopped, done]
    for s in out["sweeps"]:
        assert set(s) == SUMMARY_KEYS, s
    assert [(s["state"], s["trials_done"], s["trials_planned"], s["champion"], s["started"]) for s in out["sweeps"]] == [
        ("RUNNING", None, 4, None, 3000), ("INTERRUPTED", 1, 4, None, 2000), ("COMPLETED", 4, 4, "t2", 1000)]


def test_list_prints_each_sweep_newest_first_on_a_local_folder(tmp_path):
    _check_listing(str(tmp_path / "runs"))
    probe = ("import sys\nfrom isosweep.cli import main\n"  # it reads JSON and CSV only: no Ray, Optuna, torch or MLflow
             f"code = main(['list', '--storage', {str(tmp_path / 'runs')!r}])\n"
             "print(code, sorted({'ray', 'optuna', 'torch', 'mlflow'} & {m.partition('.')[0] for m in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr[-2000:]
    empty = isosweep("list", "--storage", tmp_path / "nothing")
    assert empty.returncode == EXIT_COMPLETED and not empty.stdout and "no sweeps under" in empty.stderr


@pytest.mark.slow
def test_list_on_s3_through_the_endpoint_query(s3_server, monkeypatch):
    env = {k: v for k, v in s3_server.env.items() if k.startswith("AWS_")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # for the writers in this process
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    _check_listing(f"s3://{s3_server.bucket}/list-test?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env)


def test_status_results_and_validate_print_json_documents(tmp_path):
    """`--json` of status, results and validate: one JSON document on stdout with the keys docs/cli.md lists; the
    human `results` names where results.csv is."""
    root = str(tmp_path / "runs")
    sweep = _sweep(root, 1_000, state=INTERRUPTED, rows=[_row("t1", "DONE", baseline=True)])
    for verb in ("status", "results"):
        proc = isosweep(verb, sweep, "--json")
        assert proc.returncode == EXIT_COMPLETED, proc.stderr[-3000:]
        out = json.loads(proc.stdout)
        assert set(out) == {"sweep_id", "uri", "state", "finished", "results_csv", "rows", "front", "backbones", "champion",
                            "driver", "progress"}, out
        assert out["sweep_id"] == st.name_of(sweep) and out["state"] == INTERRUPTED and out["finished"] is False
        assert out["results_csv"] == str(Path(sweep) / "results.csv") and isinstance(out["rows"], list)
        assert out["driver"] is None
    human = isosweep("results", sweep)
    assert human.returncode == EXIT_COMPLETED and f"results.csv: {Path(sweep) / 'results.csv'}" in human.stdout, human.stdout

    proc = isosweep("validate", DEMO, "--no-path-checks", "--json", "--set", "search.num_trials=2")
    assert proc.returncode == EXIT_COMPLETED, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"spec_file", "name", "valid", "spec", "base_model", "images", "feature_networks"}
    assert out["valid"] is True and out["name"] == "demo" and out["spec"]["search"]["num_trials"] == 2
    assert "is a valid sweep spec" in proc.stderr  # notes stay on stderr
    bad = isosweep("validate", DEMO, "--no-path-checks", "--json", "--set", "search.num_trials=-1")
    assert bad.returncode == EXIT_SPEC_ERROR and not bad.stdout and bad.stderr.startswith("error: ")


def test_status_shows_a_running_trials_step_and_when_its_training_ends(tmp_path):
    """A running trial's step, total steps and training ETA come from its checkpoints' manifests in storage (the pace
    between the two newest); a trial without a checkpoint says so."""
    from isosweep.results.layout import TRAIN_DIR, TRIALS_FILE
    from isosweep.results.readback import trial_record
    from isosweep.training.checkpoint import write_manifest

    sweep = _sweep(str(tmp_path / "runs"), 1_000, state="RUNNING")
    config = {"baseline": False, "lambda_iso": 0.1, "p": 0.5, "iso_metric": "sphere"}
    st.write_json(st.join(sweep, TRIALS_FILE), {"trials": [trial_record("t1", config, {}, "RUNNING"),
                                                           trial_record("t2", config, {}, "RUNNING")]})
    now = time.time()
    for step, age in ((200, 110), (400, 10)):  # 200 steps in 100 s: 2 steps/s, 600 to go, the newest 10 s old
        ckpt = Path(sweep) / TRAIN_DIR / "t1" / f"checkpoint_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "weights.bin").write_bytes(b"w")
        manifest = write_manifest(ckpt, step=step, max_steps=1000)
        os.utime(manifest, (now - age, now - age))
    proc = isosweep("status", sweep, "--json")
    assert proc.returncode == EXIT_COMPLETED, proc.stderr[-3000:]
    progress = json.loads(proc.stdout)["progress"]
    assert progress["t2"] is None and progress["t1"]["step"] == 400 and progress["t1"]["max_steps"] == 1000, progress
    assert 280 <= progress["t1"]["eta_s"] <= 290, progress  # 600 / 2 - 10, less the seconds this test took
    human = isosweep("status", sweep)
    assert "running t1: step 400/1000 (checkpoint " in human.stdout and "training ends in about 5 min" in human.stdout, human.stdout
    assert "running t2: no checkpoint yet" in human.stdout


def test_stop_sends_sigterm_to_the_driver_on_this_machine_and_it_stops_resumable(tmp_path):
    root = str(tmp_path / "runs")
    sweep = _sweep(root, 1_000)
    env = {**os.environ, "ISOSWEEP_LEASE_HEARTBEAT_S": "0.2", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, sweep], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        listed = json.loads(isosweep("list", "--storage", root, "--json").stdout)["sweeps"][0]
        assert listed["driver"]["pid"] == holder.pid and listed["driver"]["host"] == socket.gethostname()
        proc = isosweep("stop", st.name_of(sweep), "--storage", root, "--wait", "60")
        assert proc.returncode == EXIT_COMPLETED, proc.stdout + proc.stderr
        assert holder.wait(timeout=60) == EXIT_TERMINATED  # the CLI's SIGTERM exit: the signal was SIGTERM
        assert holder.stdout.read().strip() == "got SIGTERM"
        assert f"sent SIGTERM to the driver of {st.name_of(sweep)}: pid {holder.pid} on host" in proc.stderr
        assert proc.stdout.startswith(f"stopped sweep {st.name_of(sweep)}: state RUNNING; continue it with: isosweep resume ")
        assert not (Path(sweep) / LEASE_FILE).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    again = isosweep("stop", sweep)
    assert again.returncode == EXIT_NOT_RUNNING and not again.stdout
    assert again.stderr.strip() == f"nothing to stop: no driver is running sweep {st.name_of(sweep)} (state RUNNING)"


def test_stop_of_a_driver_on_another_host_names_the_host_and_signals_nothing(tmp_path):
    sweep = _sweep(str(tmp_path / "runs"), 1_000)
    now = time.time()
    lease = {"token": "theirs", "host": "another-node", "pid": os.getpid(), "command": "isosweep run", "started": now,
             "heartbeat": now}
    (Path(sweep) / LEASE_FILE).write_text(json.dumps(lease))
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # this pid is the lease's
    try:
        proc = isosweep("stop", sweep, "--wait", "0")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert proc.returncode == EXIT_ERROR and not seen, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: the driver of {st.name_of(sweep)} runs on host another-node")
    assert "ray job stop" in line and "`isosweep stop" in line
    assert read_state(sweep)["status"] == "RUNNING"


def test_run_resume_and_train_take_ray_address_as_ray_init_reads_it():
    """RAY_ADDRESS fills --address of the verbs that join a cluster as its driver: `local` or empty keeps the embedded
    Ray, `auto` and an address join, --address wins, submit reads it itself, and a dashboard URL is refused in one line."""
    from isosweep.cli import build_parser, ray_address_default
    from isosweep.spec import SpecError

    def address(argv: list[str], value: str | None) -> str | None:
        args = build_parser().parse_args(argv)
        ray_address_default(args, {} if value is None else {"RAY_ADDRESS": value})
        return args.address

    run = ["run", str(DEMO)]
    assert address(run, None) is None and address(run, "") is None and address(run, "local") is None
    assert address(run, "auto") == "auto" and address(run, "10.0.0.5:6379") == "10.0.0.5:6379"
    assert address(run, "ray://head:10001") == "ray://head:10001"
    assert address([*run, "--address", "other:6379"], "auto") == "other:6379"
    assert address(["resume", "some-sweep", "--storage", "runs"], "auto") == "auto"
    assert address(["train", str(DEMO)], "auto") == "auto"
    assert address(["submit", str(DEMO)], "auto") is None  # submit's own order: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS
    with pytest.raises(SpecError, match=r"RAY_ADDRESS=http://head:8265 is a dashboard address.*fix: `isosweep submit`"):
        address(run, "http://head:8265")


@pytest.mark.slow
def test_run_with_ray_address_refuses_storage_only_this_machine_sees(ray_cluster, tmp_path):
    """As `isosweep run --address` (tests/test_jobs.py): RAY_ADDRESS of a multi-node cluster with the default relative
    storage and a SQLite tracking store is refused before any preparation, naming both and the fix."""
    r = subprocess.run([sys.executable, "-m", "isosweep", "run", str(DEMO)], check=False, cwd=tmp_path, capture_output=True,
                       text=True, timeout=180, env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address})
    assert r.returncode == EXIT_SPEC_ERROR, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"the storage path '{tmp_path / 'runs'}' is a local path on one machine" in r.stderr
    assert "the tracking URI 'sqlite:" in r.stderr and "--shared-fs" in r.stderr
    assert "preparing the built-in base model" not in r.stdout + r.stderr
    assert not list(tmp_path.glob("runs/demo-*"))


def test_submit_json_needs_no_wait(tmp_path):
    proc = isosweep("submit", DEMO, "--address", "http://127.0.0.1:1", "--json")
    assert proc.returncode == EXIT_SPEC_ERROR and not proc.stdout and "needs --no-wait" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_submit_no_wait_json_prints_the_job(ray_cluster, tmp_path):
    """A real job on the session's cluster (its entrypoint `isosweep validate`, as tests/test_jobs.py submits): stdout is
    one JSON document naming the job the cluster has, and --set values stay out of it."""
    from isosweep.sweep import jobs

    spec = tmp_path / "jobspec.yaml"
    spec.write_text(json.dumps({"name": "jobtest", "search": {"num_trials": 2}, "storage": {"path": str(tmp_path / "runs")}}))
    args = [sys.executable, "-c", "import sys; from isosweep.commands import submit; from isosweep.cli import build_parser; "
            "sys.exit(submit.submit_command(build_parser().parse_args(sys.argv[1:]), command='validate'))",
            "submit", str(spec), "--address", ray_cluster.dashboard_url, "--token", ray_cluster.token, "--shared-fs",
            "--no-wait", "--json", "--set", "tracking.experiment=secret-experiment-name"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env={**ray_cluster.env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == EXIT_COMPLETED, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"job_id", "address", "entrypoint", "env", "set", "dashboard", "logs", "stop"}, out
    assert out["set"] == ["tracking.experiment"] and "secret-experiment-name" not in proc.stdout
    assert out["stop"].startswith(f"ray job stop {out['job_id']} --address ")
    client = jobs.connect(ray_cluster.dashboard_url, ray_cluster.token)
    assert client.get_job_info(out["job_id"]).entrypoint == out["entrypoint"]


@pytest.mark.slow
def test_stop_stops_a_real_sweep_driver_gracefully(tmp_path, isosweep_cache_dir):
    """`isosweep run` of the demo (tiny budgets, as tests/test_sweep.py runs it) held at its start by a tracking server
    that does not answer: `isosweep stop` on the folder the driver named finds it by its lease, the driver stops as on
    SIGTERM (exit 143, saying how to continue) and gives the lease back; the sweep never started, so its folder is no
    sweep to stop again."""
    from support.ray_cluster import free_port
    from test_sweep import TINY

    env = {**os.environ, "ISOSWEEP_CACHE": str(isosweep_cache_dir), "PYTHONUNBUFFERED": "1", "ISOSWEEP_RAY_DASHBOARD": "0",
           "ISOSWEEP_TRACKING_BACKOFF_S": "0.2", "ISOSWEEP_TRACKING_RETRIES": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "runs"
    args = [str(DEMO), "--storage", str(root), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]
    for o in TINY:
        args += ["--set", o]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "isosweep", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "waiting for MLflow" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        (sweep,) = root.glob("demo-*")
        stopped = isosweep("stop", sweep, "--wait", "120", env={"PYTHONPATH": str(ROOT)})
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert stopped.returncode == EXIT_COMPLETED, stopped.stdout + stopped.stderr
    assert code == EXIT_TERMINATED, log.read_text()[-3000:]
    assert f"sent SIGTERM to the driver of {sweep.name}: pid {proc.pid} on host {socket.gethostname()}" in stopped.stderr
    assert stopped.stdout.startswith(f"stopped sweep {sweep.name}: state ")
    assert "interrupted; `isosweep resume SWEEP_URI`" in log.read_text()
    assert not (sweep / LEASE_FILE).exists()
    again = isosweep("stop", sweep)
    assert again.returncode == EXIT_SPEC_ERROR and "not a sweep folder" in again.stderr, again.stderr
