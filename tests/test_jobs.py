"""`isosweep submit` (Ray Jobs API) and a real multi-node Ray cluster on loopback.

The slow tests share the session's cluster (`ray_cluster`: a head with the dashboard and no CPUs, two
one-CPU worker nodes, token auth on): one joins it by address the way `isosweep run --address` does, the others
submit real jobs whose entrypoint is `isosweep validate`, so they need no GPU, data or sweep code. The
fast tests cover the pieces: address forms, entrypoints, packaging, the resource check when joining.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import free_port

from isosweep.cli import build_parser
from isosweep.commands import submit
from isosweep.config import SpecError, load_spec
from isosweep.sweep import jobs

# Ray 2.60's own log-tailing client (job/sdk.py) passes ssl=None to aiohttp, which deprecates it.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "search_spaces" / "demo.yaml"


def _submit_args(spec: str | Path, address: str, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", str(spec), "--address", address, *extra])


@pytest.fixture
def tmp_spec(tmp_path: Path) -> Path:
    """A spec outside the repository, so it travels as the job's working dir with the package as a py_module."""
    path = tmp_path / "jobspec.yaml"
    path.write_text(yaml.safe_dump({"name": "jobtest", "search": {"num_trials": 2}}))
    return path


# ----------------------------------------------------------------------------------------------------
# fast: no cluster


def test_entrypoint_is_a_real_isosweep_command_that_joins_the_cluster():
    entry = jobs.build_entrypoint("search_spaces/demo.yaml", ["search.num_trials=2", "name=a b"])
    assert entry.startswith("python -m isosweep.cli run search_spaces/demo.yaml --address auto")
    import shlex

    argv = shlex.split(entry)[3:]
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.address == "auto"
    assert args.overrides == ["search.num_trials=2", "name=a b"]  # quoting survives the shell
    assert "--address" not in jobs.build_entrypoint("x.yaml", command="validate")


def test_dashboard_address_forms():
    assert jobs.dashboard_address("http://head:8265/") == "http://head:8265"
    assert jobs.dashboard_address("head:8265") == "http://head:8265"
    assert jobs.dashboard_address("ray://head:10001") == "ray://head:10001"
    assert jobs.dashboard_address("auto") == "auto"
    with pytest.raises(jobs.JobSubmitError, match="8265"):
        jobs.dashboard_address("head:6379")  # the GCS, not the Jobs API


def test_package_from_the_checkout_excludes_heavy_folders():
    pkg = jobs.build_package(DEMO if DEMO.exists() else REPO / "pyproject.toml")
    assert pkg.runtime_env["working_dir"] == str(REPO) and pkg.staging_dir is None
    assert not Path(pkg.spec_arg).is_absolute()
    for pattern in (".venv/", ".git/", "runs/", "mlruns/", "data/"):
        assert pattern in pkg.runtime_env["excludes"]


def test_package_for_a_spec_outside_the_checkout_ships_the_package_as_py_module(tmp_spec):
    pkg = jobs.build_package(tmp_spec)
    try:
        assert pkg.spec_arg == tmp_spec.name
        assert (Path(pkg.runtime_env["working_dir"]) / tmp_spec.name).read_text() == tmp_spec.read_text()
        assert pkg.runtime_env["py_modules"] == [str(REPO / "isosweep")]
    finally:
        if pkg.staging_dir:
            import shutil

            shutil.rmtree(pkg.staging_dir)


def test_token_precedence(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_token("explicit") == ("explicit", "--token")
    assert jobs.resolve_token(None) == ("from-env", "RAY_AUTH_TOKEN")


def test_invalid_spec_fails_before_any_connection(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsearch: {num_trialz: 2}\n")
    with pytest.raises(SpecError, match="num_trialz"):
        submit.submit_command(_submit_args(bad, "http://127.0.0.1:9"))


def test_unreachable_address_is_named_with_a_fix(tmp_spec, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = submit.submit_command(_submit_args(tmp_spec, address, "--token", "x"))
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach a Ray dashboard at {address}" in err and "ray dashboard" in err


def test_cli_dispatches_submit_and_returns_its_status(tmp_spec, capsys):
    from isosweep.cli import main

    code = main(["submit", str(tmp_spec), "--address", f"127.0.0.1:{free_port()}", "--token", "x"])
    assert code == 1 and "cannot reach a Ray dashboard" in capsys.readouterr().err


def test_joining_by_address_warns_where_an_embedded_run_fails(monkeypatch, capsys):
    """`isosweep run`'s Ray start (driver._start_ray): a trial bigger than the cluster stops a local run, but by
    address it only warns (an autoscaler may add nodes); a trial that fits passes quietly; the address is what
    init_ray joins. Ray itself is replaced by a 3-CPU stand-in; the slow test below uses a real cluster."""
    from isosweep.sweep import driver

    joined = []
    monkeypatch.setattr(driver, "init_ray", lambda address, dashboard=True: joined.append(address) or {})
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 3.0})
    too_big = load_spec(DEMO, ["resources.workers_per_trial=2", "resources.cpus_per_worker=2"], check_paths=False)
    with pytest.raises(SpecError, match="one trial needs 4 CPUs .* the cluster has 3"):
        driver._start_ray(too_big, "big.yaml", None, dashboard=False)
    driver._start_ray(too_big, "big.yaml", "10.0.0.1:6379", dashboard=False)
    out = capsys.readouterr().out
    assert "warning: big.yaml: field 'resources': one trial needs 4 CPUs" in out and "autoscaler" in out
    fits = load_spec(DEMO, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1.5"], check_paths=False)
    for address in (None, "10.0.0.1:6379"):
        driver._start_ray(fits, "fits.yaml", address, dashboard=False)
    assert "warning" not in capsys.readouterr().out
    assert joined == [None, "10.0.0.1:6379", None, "10.0.0.1:6379"]


# ----------------------------------------------------------------------------------------------------
# slow: a real multi-node cluster


# Run by `test_run_by_address_joins_the_cluster_and_sizes_trials_from_all_nodes` in its own process (a driver
# joined to a cluster stays joined): isosweep's own Ray start, as `isosweep run --address ADDRESS` does it.
JOIN_BY_ADDRESS = """
import json, ray
from isosweep.config import load_spec
from isosweep.sweep.driver import _start_ray
from isosweep.sweep.resources import max_concurrent

address, demo = {address!r}, {demo!r}
fits = load_spec(demo, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1"], check_paths=False)
_start_ray(fits, "fits.yaml", address, dashboard=False)  # 2 CPUs: more than any one node has, what both workers have
too_big = load_spec(demo, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1.5"], check_paths=False)
_start_ray(too_big, "too_big.yaml", address, dashboard=False)  # 3 CPUs: by address a warning, not an error
unlimited = load_spec(demo, ["search.max_concurrent_trials=null"], check_paths=False)  # 1 worker x 1 CPU
print("RESULT", json.dumps({{
    "nodes": sum(1 for n in ray.nodes() if n["Alive"]), "gcs": ray.get_runtime_context().gcs_address,
    "cpus": ray.cluster_resources().get("CPU"), "concurrent": max_concurrent(unlimited, ray.cluster_resources()),
}}))
"""


@pytest.mark.slow
def test_run_by_address_joins_the_cluster_and_sizes_trials_from_all_nodes(ray_cluster):
    """isosweep's Ray start by address joins the given cluster (not an embedded Ray), checks a trial against
    both nodes' CPUs, only warns when a trial is too big, and runs as many trials at once as both nodes fit."""
    cluster = ray_cluster
    code = JOIN_BY_ADDRESS.format(address=cluster.address, demo=str(DEMO))
    r = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=180)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, f"driver failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    out = json.loads(line[len("RESULT "):])
    assert out["nodes"] == 3 and out["cpus"] == 2.0  # head 0 + two workers of 1: the fixture's cluster, joined
    assert out["gcs"].rpartition(":")[2] == cluster.address.rpartition(":")[2]  # its GCS (nodes report their own IP)
    assert out["concurrent"] == 2  # one 1-CPU trial per CPU of the worker nodes
    assert "fits.yaml" not in r.stdout  # the 2-CPU trial fits the two worker nodes together: no warning
    assert "warning: too_big.yaml: field 'resources': one trial needs 3 CPUs" in r.stdout and "autoscaler" in r.stdout


@pytest.mark.slow
def test_submit_validate_job_succeeds_and_streams_its_output(ray_cluster, capsys):
    cluster = ray_cluster
    if not DEMO.exists():
        pytest.skip("search_spaces/demo.yaml is missing (the checkout-shipping path needs a spec in the repo)")
    spec = DEMO
    args = _submit_args(spec, cluster.dashboard_url, "--token", cluster.token, "--set", "search.num_trials=3")
    start = time.monotonic()
    code = submit.submit_command(args, command="validate")
    out, err = capsys.readouterr()
    assert code == 0, f"job failed:\n{out[-3000:]}\n{err[-3000:]}"
    job_id = next(l.split()[-1] for l in out.splitlines() if l.startswith("submitted job:"))
    assert f"{cluster.dashboard_url}/#/jobs/{job_id}" in out
    assert "num_trials: 3" in out  # the resolved spec, printed by `isosweep validate` on the cluster
    assert "is a valid sweep spec" in out + err
    client = jobs.connect(cluster.dashboard_url, cluster.token)
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED"
    info = client.get_job_info(job_id)
    assert info.entrypoint.startswith("python -m isosweep.cli validate search_spaces/demo.yaml")
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_submit_with_token_from_env_and_no_wait(ray_cluster, tmp_spec, monkeypatch, capsys):
    cluster = ray_cluster
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url, "--no-wait"), command="validate")
    out = capsys.readouterr().out
    assert code == 0
    job_id = next(l.split()[-1] for l in out.splitlines() if l.startswith("submitted job:"))
    client = jobs.connect(cluster.dashboard_url, cluster.token)
    deadline = time.monotonic() + 90
    while str(client.get_job_status(job_id).value) not in jobs.TERMINAL_STATES:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED", logs[-3000:]
    assert "name: jobtest" in logs and "num_trials: 2" in logs


@pytest.mark.slow
def test_bad_or_missing_token_fails_with_an_explanation(ray_cluster, tmp_spec, tmp_path, monkeypatch, capsys):
    cluster = ray_cluster
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url, "--token", "wrong"), command="validate")
    err = capsys.readouterr().err
    assert code == 1
    assert "rejected the auth token from --token" in err and "ray get-auth-token" in err and "RAY_AUTH_TOKEN" in err

    # no token anywhere: not in the environment, and `ray get-auth-token` finds none (empty HOME)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url), command="validate")
    err = capsys.readouterr().err
    assert code == 1
    assert "requires an auth token and none was sent" in err and "--token" in err


@pytest.mark.slow
def test_a_failing_job_returns_its_exit_code_and_the_cluster_checks_paths(ray_cluster, tmp_path, capsys):
    cluster = ray_cluster
    spec = tmp_path / "nodata.yaml"
    spec.write_text(yaml.safe_dump({"name": "nodata", "dataset": {"kind": "image_folder", "path": "/no/such/images"}}))
    # valid locally (paths are the cluster's), invalid on the cluster: `isosweep validate` exits 2 there
    code = submit.submit_command(_submit_args(spec, cluster.dashboard_url, "--token", cluster.token), command="validate")
    out, err = capsys.readouterr()
    assert code == 2, out[-2000:] + err[-2000:]
    assert "FAILED" in err and "dataset.path" in out + err
