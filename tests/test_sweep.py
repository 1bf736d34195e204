"""The sweep end to end: on an embedded local Ray, killed mid-sweep and resumed, then checked for trials,
baseline, front, champion, tables, report, MLflow runs, registry and S3 artifacts; and by address on a
multi-node cluster, with each trial's ranks on different nodes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isosweep.constants import EXIT_NO_CHAMPION

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"

# Tiny budgets: every phase runs for real, just briefly.
TINY = [
    "train.max_steps=3",
    "train.global_batch_size=4",
    "train.checkpoint_every=2",
    "train.report_every=1",
    "base_model.pretrain_steps=20",
    "base_model.pretrain_batch_size=8",
    "dataset.size=256",
    "evaluation.batch_size=16",
    "evaluation.fid.num_samples=16",
    "evaluation.fid.reference_samples=64",
    "evaluation.fid.ddim_steps=2",
    "evaluation.ppl.num_samples=8",
    "evaluation.ppl.ddim_steps=2",
    "evaluation.mrtl.num_pairs=2",
    "evaluation.mrtl.num_points=3",
    "evaluation.mrtl.ddim_steps=2",
    "evaluation.jacobian.num_samples=2",
    "evaluation.ls.num_samples=32",
    "evaluation.ls.keep=16",
    "evaluation.ls.ddim_steps=2",
    "evaluation.edit.num_samples=2",
    "evaluation.edit.columns=3",
    "evaluation.edit.iterations=2",
    "evaluation.edit.ddim_steps=2",
    "evaluation.inversion.num_images=2",
    "evaluation.inversion.ddim_steps=2",
    "evaluation.inversion.shown=2",
]


@pytest.fixture(scope="module")
def cache_env(isosweep_cache_dir):
    cache = isosweep_cache_dir  # shared with the other modules' sweeps (tests/test_staged_sweep.py)
    old = os.environ.get("ISOSWEEP_CACHE")
    os.environ["ISOSWEEP_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("ISOSWEEP_CACHE", None)
    else:
        os.environ["ISOSWEEP_CACHE"] = old


def _runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _evaluated_results(experiment_dir: Path) -> dict[str, int]:
    """trial dir name -> number of evaluated (final) results it has reported."""
    counts = {}
    for result in experiment_dir.rglob("result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        counts[result.parent.name] = sum(1 for x in lines if x.get("evaluated"))
    return counts


def _kill_the_first_trials_workers(proc: subprocess.Popen, storage: Path, deadline: float, log: Path) -> str:
    """SIGKILL the Train workers of the sweep's first trial (the baseline: trials run one at a time) once Ray
    Train has registered one of its checkpoints (its snapshot file lists them); returns its trial id.
    Workers are found among the driver's descendants by the process title Ray gives them."""
    from support.ray_cluster import _descendants, _proc_table

    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        runs = list(storage.glob("demo-*/train/*/"))
        assert len(runs) <= 1, f"the baseline finished before its workers could be killed: {runs}"
        if runs and (runs[0] / "checkpoint_manager_snapshot.json").exists():
            table = _proc_table()
            workers = [p for p in _descendants(proc.pid, table) if "RayTrainWorker" in table[p][2]]
            if workers:
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
                return runs[0].name
        time.sleep(0.2)
    pytest.fail("the first trial wrote no checkpoint within 10 minutes")


@pytest.mark.slow
def test_demo_sweep_interrupted_resumed_and_complete(tmp_path, cache_env, mlflow_server):
    """The demo sweep as a user runs it, with tracking on a real `mlflow server` whose artifacts land in a
    moto S3 bucket, and `search.max_failures=0`. The baseline fails: its Train workers are killed (SIGKILL)
    once it has a checkpoint, and with no failure budget it ends ERROR. After the next trial finished,
    Ctrl-C (SIGINT to the driver's process group, as a terminal sends it): the sweep stops at a safe point,
    records INTERRUPTED with the errored baseline, ends its MLflow parent run KILLED, promotes nothing,
    prints the resume command and exits 130. `isosweep resume` then runs the baseline again from its own
    checkpoint (a resume is a fresh failure budget) and completes the sweep without rerunning the
    finished trial or duplicating an MLflow run, and everything a finished sweep promises is there
    (rows, front, champion, tables, report, runs, registry, S3 artifacts).
    One sweep serves these checks: each demo sweep costs about three minutes on two cores."""
    from mlflow.exceptions import MlflowException

    from isosweep.constants import EXIT_SWEEP_BUSY
    from isosweep.data.datasets import ShapesDataset
    from isosweep.evaluation.record import read_record
    from isosweep.results.layout import LEASE_FILE
    from isosweep.results.pareto import lower_beyond_noise
    from isosweep.results.readback import read_sweep
    from isosweep.training.checkpoint import load_train_state

    storage = tmp_path / "runs"
    env = {**os.environ, "ISOSWEEP_CACHE": str(cache_env), "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(DEMO), "--storage", str(storage), "--tracking-uri", mlflow_server.uri]
    for o in TINY + ["search.num_trials=2", "search.max_concurrent_trials=1", "search.max_failures=0"]:
        args += ["--set", o]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "isosweep", "run", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    deadline = time.time() + 600
    sweep_dirs: list[Path] = []
    try:
        baseline_id = _kill_the_first_trials_workers(proc, storage, deadline, tmp_path / "first.log")
        while time.time() < deadline:
            sweep_dirs = [p for p in storage.glob("demo-*") if p.is_dir()]
            if sweep_dirs and sum(_evaluated_results(sweep_dirs[0]).values()) >= 1:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("no trial finished within 10 minutes")
        time.sleep(3)  # let Tune write its experiment state
        second = subprocess.run([sys.executable, "-m", "isosweep", "resume", *args], capture_output=True, text=True,
                                env=env, timeout=300)  # a second driver while this one runs: refused, nothing written
        assert second.returncode == EXIT_SWEEP_BUSY and f"pid {proc.pid} on host" in second.stderr + second.stdout, second
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group gets it
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = (tmp_path / "first.log").read_text()
    sweep_dir = sweep_dirs[0]
    assert code == 130, first[-4000:]
    assert f"isosweep resume {sweep_dir}" in first and "INTERRUPTED" in first, first[-3000:]
    state = json.loads((sweep_dir / "isosweep_sweep.json").read_text())
    assert state["status"] == "INTERRUPTED" and (state["unfinished"] or state["not_started"]), state
    assert state["errored"] == [baseline_id], state
    assert "failure budget spent" in first and "promoted nothing" in first, first[-3000:]
    assert not (sweep_dir / "sweep_done.json").exists() and not (sweep_dir / LEASE_FILE).exists()  # lease given back
    client, _ = _runs(mlflow_server.uri, "demo")
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    with pytest.raises(MlflowException):  # nothing promoted from a partial sweep
        client.get_model_version_by_alias("isodiff-demo", "champion")  # the spec's registry name
    before = _evaluated_results(sweep_dir)
    finished = [k for k, v in before.items() if v]
    assert finished

    # resumed with an operational change: Tune keeps the concurrency the sweep started with, and says so
    out = subprocess.run([sys.executable, "-m", "isosweep", "resume", *args, "--set", "search.max_concurrent_trials=2",
                          "--allow-changes"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "trials run at most 1 at once, as when this sweep started" in out.stdout + out.stderr
    after = _evaluated_results(sweep_dir)
    assert len(after) == 3
    for name in finished:
        assert after[name] == 1, f"finished trial {name} was rerun"
    assert all(v == 1 for v in after.values()), after
    assert (sweep_dir / "sweep_done.json").exists() and not (sweep_dir / LEASE_FILE).exists()

    # the rows, front and champion, rebuilt from storage
    spec, outcome = read_sweep(sweep_dir)
    rows = outcome.rows
    assert len(rows) == 3
    base = [r for r in rows if r["baseline"]]
    assert len(base) == 1 and base[0]["lambda_iso"] == 0.0 and base[0]["p"] == 1.0
    assert base[0]["trial_id"] == baseline_id and not any(baseline_id in name for name in finished)
    assert load_train_state(base[0]["checkpoint_path"])["resumed_at"], "the failed baseline restarted from scratch"
    assert all(r["status"] == "DONE" for r in rows), rows
    for r in rows:
        for k in spec.evaluation.metrics:  # the demo measures all eleven: each finite and in its range
            assert math.isfinite(r[k]), (k, r)
        assert r["fid"] > 0 and r["ppl"] > 0 and r["mrtl"] > 0 and r["mcn"] >= 1 and r["vor"] >= 0, r
        assert 1 <= r["ls"] <= math.prod(ShapesDataset.num_classes) + 1e-9, r  # exp(sum H(Y_i|X_i)) <= prod |Y_i|
        assert r["edit_linearity"] <= 1 and 0 < r["edit_straightness"] <= 1 + 1e-9 and 0 <= r["edit_consistency"] <= 1, r
        assert r["inversion_mse"] >= 0 and r["inversion_perceptual"] >= 0, r
        assert r["backbone_fid"] and r["backbone_ppl"] and r["backbone_ls"]
        record = read_record(r["checkpoint_path"])  # what the workers wrote is what the table shows
        assert record is not None and all(record.metrics[k] == pytest.approx(r[k]) for k in spec.evaluation.metrics), (record, r)
    assert outcome.front and outcome.champion is not None
    # the rule (docs/metrics.md, "How trials are compared"): the baseline, or a trial within the FID tolerance whose
    # PPL interval lies wholly below the baseline's (it may be off the front: a trial better only inside the noise
    # can dominate it, as a trial with a lower FID can dominate the baseline)
    champ = outcome.champion.row
    assert champ is base[0] or (lower_beyond_noise(champ, base[0], "ppl") and not math.isnan(champ["ppl_hi"])
                                and champ["fid"] <= base[0]["fid"] * (1 + spec.selection.fid_tolerance)), (champ, base[0])
    assert all(r["lambda_iso"] > 0 for r in rows if not r["baseline"])

    # tables and report from the driver that finished the sweep
    assert (sweep_dir / "results.csv").is_file() and (sweep_dir / "pareto.png").is_file()
    md = (sweep_dir / "results.md").read_text()
    assert "baseline" in md and "champion" in md
    report = sweep_dir / "report" / "report.md"
    assert f"{outcome.champion.row['fid']:.4g}" in report.read_text()
    assert (sweep_dir / "report" / "rtl_curves.png").is_file() and (sweep_dir / "report" / "strips_slerp.png").is_file()
    assert (sweep_dir / "report" / "edits_baseline.png").is_file() and (sweep_dir / "report" / "edits_champion.png").is_file()
    assert "## Local Basis edits (Fig. 7)" in report.read_text()
    assert (sweep_dir / "report" / "inversion_baseline.png").is_file() and (sweep_dir / "report" / "inversion_champion.png").is_file()
    assert "## DDIM inversion" in report.read_text()

    # MLflow: one parent, one child per trial (the resumed one reopened, not duplicated), each FINISHED
    state = json.loads((sweep_dir / "isosweep_sweep.json").read_text())
    assert state["tracking_uri"] == mlflow_server.uri and state["status"] == "COMPLETED"
    client, runs = _runs(mlflow_server.uri, spec.experiment_name)
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert len([r for r in runs if r.data.tags.get("isosweep.role") == "sweep"]) == 1  # resume reused the parent run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert len(children) == 3, "a resumed trial must reopen its MLflow run, not duplicate it"
    assert all(r.info.status == "FINISHED" and "fid" in r.data.metrics for r in children)
    # the cost of each phase: training and each metric of the final evaluation, in seconds, on every run
    assert all(r.data.metrics["cost_train_s"] > 0 and r.data.metrics["cost_fid_s"] > 0 for r in children)
    mv = client.get_model_version_by_alias(spec.registry_name, "champion")
    assert mv.run_id == outcome.champion.row["mlflow_run_id"]
    # what a user does next (README): `isosweep pull` downloads @champion and loads it (tests/test_specs_e2e.py counts
    # this run as demo.yaml's end-to-end run: keep the spec's registry name and this check)
    pulled = subprocess.run([sys.executable, "-m", "isosweep", "pull", f"models:/{spec.registry_name}@champion", "--out",
                             str(tmp_path / "pulled")], capture_output=True, text=True,
                            env={**env, "MLFLOW_TRACKING_URI": mlflow_server.uri}, timeout=300)
    assert pulled.returncode == 0 and "pulled models:/isodiff-demo@champion" in pulled.stdout, pulled.stderr[-3000:]

    # the artifacts are in the bucket: every trial's checkpoint and images, the parent's summary
    keys = mlflow_server.s3.keys("mlflow/")
    for child in children:
        mine = [k for k in keys if f"/{child.info.run_id}/" in k]
        assert any(k.endswith("checkpoint/unet/diffusion_pytorch_model.safetensors") for k in mine), mine
        assert any(k.endswith(".png") and "/eval/" in k for k in mine), mine
    assert any(f"/{state['parent_run_id']}/" in k and k.endswith("pareto.png") for k in keys)

    # `isosweep results` rebuilds the table from storage alone
    res = subprocess.run([sys.executable, "-m", "isosweep", "results", str(sweep_dir)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished" in res.stdout and "baseline" in res.stdout and "champion:" in res.stdout
    assert res.stdout.count(" DONE") == 3


@pytest.mark.slow
def test_sigterm_stops_a_command_as_ctrl_c_does_and_exits_143(tmp_path, cache_env):
    """SIGTERM to the driver alone (as Kubernetes, Slurm or `ray job stop` send it) while the sweep waits for its tracking
    server: the command stops, says how to continue, and exits 143 (Ray's own handler would exit 15, FAILED). The
    graceful stop of running trials by `ray job stop` is test_cluster_sweep_survives_losing_the_whole_cluster's."""
    from support.ray_cluster import free_port

    env = {**os.environ, "ISOSWEEP_CACHE": str(cache_env), "PYTHONUNBUFFERED": "1", "ISOSWEEP_RAY_DASHBOARD": "0",
           "ISOSWEEP_TRACKING_BACKOFF_S": "0.2", "ISOSWEEP_TRACKING_RETRIES": "1"}
    args = [str(DEMO), "--storage", str(tmp_path / "runs"), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]
    for o in TINY:
        args += ["--set", o]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "isosweep", "run", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while "waiting for MLflow" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # the driver only, not its process group
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 143, log.read_text()[-3000:]
    assert "interrupted; `isosweep resume SWEEP_URI`" in log.read_text()


@pytest.mark.slow
def test_a_tracking_outage_loses_no_trial_and_sync_then_promote_recover(tmp_path, cache_env, mlflow_server):
    """The tracking server is unreachable (503 from a proxy in front of the real `mlflow server`) when the
    sweep starts: the sweep waits for it instead of failing, and starts once it is back. It goes away again
    once training has started and stays down to the end. Every trial still finishes DONE (nothing turns into an
    error), the sweep is COMPLETED with its results in storage, promotes nothing and says why (exit 5, EXIT_NO_CHAMPION);
    once the server is back, `isosweep sync` records each trial exactly once and `isosweep promote`
    moves @champion to the champion the table names.
    The tracking URI carries a password (`http://user:password@host`) and the environment a token: neither
    appears in any file the sweep wrote, in its output, or in any MLflow param, tag or artifact."""
    from support.servers import LosingProxy

    proxy = LosingProxy(mlflow_server.uri)
    storage = tmp_path / "runs"
    password, token = "pw-SECRET-0x5eed", "tok-SECRET-0xbeef"
    env = {**os.environ, "ISOSWEEP_CACHE": str(cache_env), "PYTHONUNBUFFERED": "1", "ISOSWEEP_TRACKING_RETRIES": "2",
           "ISOSWEEP_TRACKING_BACKOFF_S": "0.2", "HF_TOKEN": token}
    registry = "isodiff-outage"
    args = [str(DEMO), "--storage", str(storage), "--tracking-uri", proxy.uri.replace("://", f"://isosweep:{password}@")]
    # screened (evaluation.screening): the full evaluations run while the server is down, so `sync` must log them
    screening = "evaluation.screening={fid: {num_samples: 8, ddim_steps: 2}, ppl: {num_samples: 4, ddim_steps: 2}}"
    for o in TINY + ["search.num_trials=1", "evaluation.metrics=[fid, ppl]", f"tracking.registry_name={registry}",
                     "tracking.experiment=outage", screening]:
        args += ["--set", o]
    try:
        log = open(tmp_path / "run.log", "w")
        proxy.down.set()  # down at the start
        proc = subprocess.Popen([sys.executable, "-m", "isosweep", "run", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and "waiting for MLflow" not in (tmp_path / "run.log").read_text():
            time.sleep(0.5)
        time.sleep(2)
        refused_at_start = proxy.refused
        proxy.down.clear()  # back after the sweep has waited a while
        while time.time() < deadline and proc.poll() is None:
            if list(storage.glob("demo-*/train/*/checkpoint_*")):  # training has started: the server goes away
                proxy.down.set()
                break
            time.sleep(0.5)
        code = proc.wait(timeout=900)
        out = (tmp_path / "run.log").read_text()
        assert refused_at_start > 0 and "waiting for MLflow at" in out, out[-3000:]
        assert proxy.down.is_set() and proxy.refused > refused_at_start, out[-3000:]
        assert code == EXIT_NO_CHAMPION, out[-4000:]
        assert "promoted nothing: MLflow lacks the records of" in out, out[-3000:]
        sweep_dir = next(storage.glob("demo-*"))
        state = json.loads((sweep_dir / "isosweep_sweep.json").read_text())
        assert state["status"] == "COMPLETED" and len(state["tracking_pending"]) >= 1, state
        assert (sweep_dir / "sweep_done.json").exists() and (sweep_dir / "results.csv").is_file()
        assert out.count(" DONE") >= 2 and " ERROR" not in out
        proxy.down.clear()  # the server is back
        sync = subprocess.run([sys.executable, "-m", "isosweep", "sync", str(sweep_dir), "--tracking-uri", mlflow_server.uri],
                              capture_output=True, text=True, env=env, timeout=300)
        assert sync.returncode == 0, sync.stdout[-2000:] + sync.stderr[-3000:]
    finally:
        proxy.close()
    client, runs = _runs(mlflow_server.uri, "outage")
    assert len([r for r in runs if r.data.tags.get("isosweep.role") == "sweep"]) == 1  # the wait made one parent run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert sorted(r.data.tags["isosweep.trial_id"] for r in children) == sorted({r.data.tags["isosweep.trial_id"] for r in children})
    assert len(children) == 2 and all("fid" in r.data.metrics for r in children)
    import csv
    table = {r["trial_id"]: r for r in csv.DictReader(open(sweep_dir / "results.csv"))}
    base = next(r for r in table.values() if r["baseline"] == "True")
    assert "screening: " in out and base["fidelity"] == "full", out[-3000:]  # the baseline is always evaluated in full
    for run in children:  # what MLflow says is what the table says: the full numbers, the screening ones beside them
        row = table[run.data.tags["isosweep.trial_id"]]
        if row["fidelity"] == "full":
            assert run.data.metrics["fid"] == pytest.approx(float(row["fid"])) and "screen_fid" in run.data.metrics
            assert float(row["screen_fid"]) == pytest.approx(run.data.metrics["screen_fid"])
    res = subprocess.run([sys.executable, "-m", "isosweep", "results", str(sweep_dir)], capture_output=True, text=True,
                         env=env, timeout=120)
    champion = next(line.split()[1].rstrip(":") for line in res.stdout.splitlines() if line.startswith("champion:"))
    pro = subprocess.run([sys.executable, "-m", "isosweep", "promote", str(sweep_dir), "--trial", champion,
                          "--tracking-uri", mlflow_server.uri], capture_output=True, text=True, env=env, timeout=300)
    assert pro.returncode == 0, pro.stdout[-2000:] + pro.stderr[-3000:]
    mv = client.get_model_version_by_alias(registry, "champion")
    assert mv.run_id == next(r.info.run_id for r in children if r.data.tags["isosweep.trial_id"] == champion)
    _assert_no_secret((password, token), storage, [out, sync.stdout, sync.stderr, res.stdout, pro.stdout, pro.stderr],
                      runs, mlflow_server)


def _assert_no_secret(secrets, storage: Path, outputs: list[str], runs, mlflow_server) -> None:
    """No secret in any file under storage (pickles and checkpoints included), the commands' output, or any
    MLflow param, tag or artifact (in the S3 bucket) of the runs."""
    for path in storage.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(x.encode() in data for x in secrets), path
    assert not any(x in text for x in secrets for text in outputs)
    for run in runs:
        for k, v in {**run.data.params, **run.data.tags}.items():
            assert not any(x in f"{k}={v}" for x in secrets), (run.info.run_id, k)
    s3 = mlflow_server.s3.client()
    for key in mlflow_server.s3.keys("mlflow/"):
        if any(f"/{run.info.run_id}/" in key for run in runs):
            body = s3.get_object(Bucket=mlflow_server.s3.bucket, Key=key)["Body"].read()
            assert not any(x.encode() in body for x in secrets), key


@pytest.mark.slow
def test_sweep_by_address_puts_a_trials_ranks_on_different_nodes(tmp_path, cache_env, ray_cluster):
    """`isosweep run --address` on a cluster shaped like a real one (a head with no CPUs for trials, two
    one-CPU worker nodes): each trial's two DDP ranks run on the two worker nodes, never the head, and every
    trial's checkpoints and evaluation reach the sweep's storage.

    Meanwhile a real Prometheus with the shipped scrape config (clusters/monitoring/prometheus.yml, pointed at
    this cluster's temp dir) scrapes the cluster: the sweep's, evaluations' and trainings' isosweep series
    arrive with the values the sweep's own results show, and every query of the shipped Grafana dashboard
    runs (tests/test_monitoring.py checks the names without a server)."""
    from support.prometheus_server import prometheus_binary, start_prometheus
    from support.ray_cluster import node_ids

    env = {**ray_cluster.env, "ISOSWEEP_CACHE": str(cache_env), "PYTHONUNBUFFERED": "1"}
    # --shared-fs: every node of this loopback cluster is this machine, so they all see the local storage
    args = [str(DEMO), "--address", ray_cluster.address, "--storage", str(tmp_path / "runs"), "--shared-fs"]
    for o in TINY + ["search.num_trials=1", "resources.workers_per_trial=2", "search.max_concurrent_trials=1"]:
        args += ["--set", o]
    binary = prometheus_binary()
    if binary is None and os.environ.get("CI"):
        pytest.fail("no prometheus binary: `make test` installs Debian's package (apt-get install prometheus)")
    sd_file = ray_cluster.temp_dir / "prom_metrics_service_discovery.json"  # the head's --temp-dir, not /tmp/ray
    started = time.time()
    with start_prometheus(sd_file, tmp_path / "prometheus") if binary else contextlib.nullcontext() as prom:
        out = subprocess.run([sys.executable, "-m", "isosweep", "run", *args], capture_output=True, text=True,
                             env=env, timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:] + ray_cluster.log_tail()
        assert "champion:" in out.stdout and "baseline" in out.stdout
        sweep_dir = next((tmp_path / "runs").glob("demo-*"))
        assert (sweep_dir / "sweep_done.json").exists()
        assert len(_evaluated_results(sweep_dir)) == 2
        nodes = node_ids(ray_cluster)
        trials = sorted(p for p in (sweep_dir / "train").iterdir() if p.is_dir())
        assert len(trials) == 2
        for trial in trials:
            final = sorted(p for p in trial.glob("checkpoint_*") if p.is_dir())[-1]
            assert (final / "model_index.json").is_file() and (final / "train_state.pt").is_file()
            assert (final / "eval" / "metrics.json").is_file()
            workers = json.loads((final / "spec.json").read_text())["workers"]
            assert [w["rank"] for w in workers] == [0, 1]
            ran_on = [w["node_id"] for w in workers]
            assert len(set(ran_on)) == 2 and set(ran_on) == set(nodes["workers"]), (ran_on, nodes)
        if prom is not None:
            time.sleep(4)  # the last scrape of values the driver sent before it exited
            _assert_prometheus_saw_the_sweep(prom, sweep_dir, started)
    if binary is None:
        pytest.skip("sweep checked; its Prometheus series were not: no prometheus binary (apt-get install prometheus)")


def _assert_prometheus_saw_the_sweep(prom, sweep_dir: Path, started: float) -> None:
    """The isosweep series Prometheus scraped during the sweep of `sweep_dir` (2 trials, tiny budgets), against
    the sweep's own results; then every query of the shipped dashboard. The processes that set the gauges have
    exited by now, so each check reads the series' history ([window] ranges), as a dashboard does afterwards."""
    import csv

    from support.prometheus_server import dashboard_queries, label_values_selector

    assert sum(t["health"] == "up" for t in prom.targets()) >= 3, prom.targets()  # each node's metrics export port
    sweep, window = sweep_dir.name, f"{int(time.time() - started) + 60}s"
    sel = f'sweep="{sweep}"'

    def values(promql: str, *labels: str) -> dict:
        return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in prom.query(promql)}

    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    trial_ids = {r["trial_id"] for r in rows}
    assert len(trial_ids) == 2
    # the sweep, from the driver: trials by state at the end and during the sweep, the best and baseline values
    assert values(f"max(max_over_time(ray_isosweep_sweep_trials_planned{{{sel}}}[{window}]))") == {(): 2.0}
    assert values(f"max by (state) (last_over_time(ray_isosweep_sweep_trials{{{sel}}}[{window}]))", "state") == {
        ("done",): 2.0, ("failed",): 0.0, ("running",): 0.0, ("pending",): 0.0}
    assert values(f'max(max_over_time(ray_isosweep_sweep_trials{{{sel},state="running"}}[{window}]))') == {(): 1.0}
    assert values(f"max(last_over_time(ray_isosweep_sweep_eta_seconds{{{sel}}}[{window}]))") == {(): 0.0}
    assert min(values(f"min_over_time(ray_isosweep_sweep_eta_seconds{{{sel}}}[{window}])").values()) >= 0
    for objective in ("fid", "ppl"):
        finite = {r["trial_id"]: float(r[objective]) for r in rows if r[objective] and math.isfinite(float(r[objective]))}
        base = next(float(r[objective]) for r in rows if r["baseline"] == "True")
        got = values(f'last_over_time(ray_isosweep_trial_objective{{{sel},objective="{objective}"}}[{window}])', "trial")
        assert got == pytest.approx({(t,): v for t, v in finite.items()}, rel=1e-9), objective
        best = values(f'min(last_over_time(ray_isosweep_sweep_best{{{sel},objective="{objective}"}}[{window}]))')
        assert best == pytest.approx({(): min(finite.values())}, rel=1e-9), objective
        if math.isfinite(base):
            assert values(f'max(last_over_time(ray_isosweep_sweep_baseline{{{sel},objective="{objective}"}}[{window}]))') == \
                pytest.approx({(): base}, rel=1e-9)
    # training (rank 0 of each trial): the last step is max_steps
    steps = values(f"max by (trial) (max_over_time(ray_isosweep_train_step{{{sel}}}[{window}]))", "trial")
    assert steps == {(t,): 3.0 for t in trial_ids}, steps
    # evaluation (every rank): units done never pass the planned ones, some metric went past 0 in every trial,
    # and what a rank plans is its share of the spec's count (16 FID samples, 8 PPL pairs, ... over 2 ranks)
    done = values(f"max_over_time(ray_isosweep_eval_samples_done{{{sel}}}[{window}])", "trial", "metric", "rank")
    planned = values(f"max_over_time(ray_isosweep_eval_samples_planned{{{sel}}}[{window}])", "trial", "metric", "rank")
    assert done and set(done) == set(planned) and {k[0] for k in done} == trial_ids, (done, planned)
    assert all(0 <= done[k] <= planned[k] for k in done), (done, planned)
    assert all(any(v > 0 for k, v in done.items() if k[0] == t) for t in trial_ids), done
    counts = {"fid": 16, "ppl": 8, "mrtl": 2, "jacobian": 2 * 2, "ls": 32, "edit": 2,
              "inversion": 2}  # TINY; jacobian: 2 samples x demo's 2 t
    assert all(planned[k] == counts[k[1]] // 2 for k in planned), planned
    # every dashboard query runs; those of isosweep's panels (and Ray's CPU, memory, actors) find series
    end = time.time()
    may_be_empty = {"Being computed", "GPU use", "GPU memory used"}  # a share may end between two exports; no GPUs here
    for title, query in dashboard_queries():
        query = query.replace("$sweep", sweep).replace("$trial", ".*")
        selector = label_values_selector(query)
        if selector is not None:
            label = query.rsplit(",", 1)[1].strip(" )")
            found = prom.label_values(label, selector)
            assert (trial_ids if label == "trial" else {sweep}) <= set(found), (title, found)
            continue
        result = prom.query_range(query, started, end, step=2)
        assert result or title in may_be_empty, f"{title}: no series for {query}"


def _isosweep(args: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "isosweep", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _table(stdout: str) -> list[str]:
    """The results table's lines (header `role  trial_id ...` to the first blank line), trailing spaces cut."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("role") and "trial_id" in line)
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line.rstrip())
    return out


@pytest.mark.slow
@pytest.mark.extended  # about ten minutes on two cores: `make test-extended`
def test_cluster_sweep_survives_losing_the_whole_cluster(tmp_path, cache_env, mlflow_server):
    """The run-book of docs/operations.md, for real on loopback: a multi-node cluster (`ray start`), sweep
    storage in S3 through the endpoint-query URI, tracking on an `mlflow server` whose artifacts are in the
    same S3 server. Submit as a Ray job; watch with `isosweep status` from elsewhere; after a trial
    finished, lose a worker node, stop the job and the whole cluster and delete the submitting folder;
    resume on a fresh cluster from a third folder with only the storage and tracking URIs. The sweep
    completes without rerunning the finished trial or duplicating MLflow runs, the champion is registered
    once, and `isosweep results` from a fourth folder prints the driver's table."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from support.ray_cluster import kill_worker_node, start_local_cluster, stop_local_cluster
    from support.servers import DUMMY_AWS

    s3 = mlflow_server.s3
    port = s3.endpoint_url.rsplit(":", 1)[1]
    root = f"s3://{s3.bucket}/cluster-native?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    registry = "isodiff-cluster-native"
    # one trial at a time: the second is still training when the first shows DONE, so there is a window to lose the cluster in
    overrides = TINY + ["name=cnative", "search.num_trials=1", "search.max_concurrent_trials=1", "evaluation.metrics=[fid, ppl]",
                        f"storage.path={root}",
                        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=cluster-native", f"tracking.registry_name={registry}"]
    # the nodes have S3 credentials in their environment, as a cloud node has them from its role
    node_env = {**DUMMY_AWS, "ISOSWEEP_CACHE": str(cache_env), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    watcher_env = {**os.environ, **DUMMY_AWS, "PYTHONUNBUFFERED": "1"}
    watcher_env.pop("ISOSWEEP_CACHE", None)

    cluster = start_local_cluster(worker_nodes=2, head_cpus=0, worker_cpus=1, auth=True,
                                  worker_resources={"trial_node": 1}, extra_env=node_env)
    submitting = tmp_path / "laptop"
    try:
        # 1. submit from a checkout copy (the submitting folder), following nothing
        submitting.mkdir()
        spec = submitting / "demo.yaml"
        spec.write_text(DEMO.read_text())
        args = ["submit", str(spec), "--no-wait", "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]
        for o in overrides:
            args += ["--set", o]
        sub = _isosweep(args, {**cluster.env, **DUMMY_AWS, "RAY_ADDRESS": cluster.dashboard_url}, submitting, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job_id = next(line.split()[-1] for line in sub.stdout.splitlines() if line.startswith("submitted job:"))
        assert DUMMY_AWS["AWS_SECRET_ACCESS_KEY"] not in sub.stdout + sub.stderr

        # 2. watch from another folder, by storage URI, until a trial has finished
        deadline, status = time.time() + 420, None
        jobs = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
        while time.time() < deadline:
            status = _isosweep(["status", "cnative", "--storage", root], watcher_env, tmp_path / "watch", timeout=120)
            if status.returncode == 0 and " DONE" in status.stdout:
                break
            state = str(jobs.get_job_status(job_id).value)
            assert state in ("PENDING", "RUNNING"), f"job {state}:\n{jobs.get_job_logs(job_id)[-4000:]}"
            time.sleep(3)
        else:
            pytest.fail(f"no trial finished in time:\n{status.stdout if status else ''}\n{jobs.get_job_logs(job_id)[-4000:]}")
        assert "running or interrupted" in status.stdout, status.stdout + jobs.get_job_logs(job_id)[-6000:]
        sweep_uri = next(line.split(" ", 1)[1] for line in status.stdout.splitlines() if line.startswith("storage: "))
        sweep_id = status.stdout.split()[1]
        finished_keys = {k for k in s3.keys(f"cluster-native/{sweep_id}/train/") if k.endswith("eval/metrics.json")}
        assert finished_keys

        # 3. lose a worker node, stop the job (`ray job stop`: SIGTERM to the driver, which stops as on Ctrl-C: the sweep
        # records INTERRUPTED and ends its parent run KILLED), stop every node, delete the submitting folder
        kill_worker_node(cluster, 0)
        jobs.stop_job(job_id)
        state_key = f"cluster-native/{sweep_id}/isosweep_sweep.json"
        deadline, state = time.time() + 150, {}
        while time.time() < deadline and state.get("status") != "INTERRUPTED":
            time.sleep(2)
            state = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=state_key)["Body"].read())
        logs = jobs.get_job_logs(job_id)
        assert state.get("status") == "INTERRUPTED", f"{state}\n{logs[-4000:]}"
        assert MlflowClient(mlflow_server.uri).get_run(state["parent_run_id"]).info.status == "KILLED"
        assert "isosweep resume" in logs and "promoted nothing" in logs, logs[-4000:]
    finally:
        stop_local_cluster(cluster)
    shutil.rmtree(submitting)
    assert not s3.keys(f"cluster-native/{sweep_id}/sweep_done.json")

    # 4. a fresh cluster; resume from a third folder with only the storage and tracking URIs
    fresh = start_local_cluster(worker_nodes=2, head_cpus=0, worker_cpus=1, auth=True,
                                worker_resources={"trial_node": 1}, extra_env=node_env)
    try:
        env = {**fresh.env, **DUMMY_AWS, "ISOSWEEP_CACHE": str(cache_env), "PYTHONUNBUFFERED": "1"}
        out = _isosweep(["resume", "cnative", "--storage", root, "--tracking-uri", mlflow_server.uri, "--address", fresh.address],
                        env, tmp_path / "third")
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:] + fresh.log_tail()
    finally:
        stop_local_cluster(fresh)

    # 5. complete; the finished trial not rerun; one MLflow child per trial; the champion registered once
    assert s3.keys(f"cluster-native/{sweep_id}/sweep_done.json")
    results_after = {k for k in s3.keys(f"cluster-native/{sweep_id}/train/") if k.endswith("eval/metrics.json")}
    assert finished_keys <= results_after and len(results_after) == 2
    for key in finished_keys:  # the finished trial's folder got no new checkpoint
        trial = key.split("/train/")[1].split("/")[0]
        before = {k for k in results_after if f"/train/{trial}/" in k}
        assert before == {key}, f"finished trial {trial} was rerun: {before}"
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("cluster-native")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("isosweep.role") == "sweep"]
    assert len(parents) == 1, "the resume must reuse the sweep's parent run"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trial_ids = [r.data.tags.get("isosweep.trial_id") for r in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2, trial_ids
    assert all(r.info.status == "FINISHED" and "fid" in r.data.metrics for r in children)
    versions = client.search_model_versions(f"name='{registry}'")
    champion = client.get_model_version_by_alias(registry, "champion")
    assert len({v.run_id for v in versions}) == len(versions), "a trial was registered twice"
    assert champion.run_id in {r.info.run_id for r in children}

    # the same table from a fourth folder, by the sweep's URI, as the driver printed
    res = _isosweep(["results", sweep_uri], watcher_env, tmp_path / "fourth", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished" in res.stdout
    assert _table(res.stdout) == _table(out.stdout)
