"""`isosweep submit` (Ray Jobs API) and a real multi-node Ray cluster on loopback.

The slow tests share the session's cluster (`ray_cluster`: a head with the dashboard and no CPUs, two
one-CPU worker nodes, token auth on): one joins it by address the way `isosweep run --address` does, the others
submit real jobs whose entrypoint is `isosweep validate`, so they need no GPU, data or sweep code. The
fast tests cover the pieces: address forms, entrypoints, packaging, the resource check when joining.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.ray_cluster import free_port

from isosweep import cli
from isosweep.cli import build_parser
from isosweep.commands import submit
from isosweep.constants import OVERRIDES_ENV
from isosweep.spec import SpecError, load_spec
from isosweep.sweep import jobs

# Ray 2.60's own log-tailing client (job/sdk.py) passes ssl=None to aiohttp, which deprecates it.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "search_spaces" / "demo.yaml"


def _submit_args(spec: str | Path, address: str | None, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", str(spec), *(["--address", address] if address else []), *extra])


@pytest.fixture
def tmp_spec(tmp_path: Path) -> Path:
    """A spec outside the repository, so it travels as the job's working dir with the package as a py_module.

    Its storage is an absolute path: with --shared-fs (true of a loopback cluster: every node is this
    machine) the submission goes ahead."""
    path = tmp_path / "jobspec.yaml"
    path.write_text(yaml.safe_dump({"name": "jobtest", "search": {"num_trials": 2}, "storage": {"path": str(tmp_path / "runs")}}))
    return path


@pytest.fixture
def no_address_env(monkeypatch):
    for var in jobs.ADDRESS_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)


# ----------------------------------------------------------------------------------------------------
# fast: no cluster


def test_entrypoint_is_a_real_isosweep_command_that_joins_the_cluster_and_carries_no_values():
    entry = jobs.build_entrypoint("search_spaces/demo.yaml")
    assert entry == "python -m isosweep.cli run search_spaces/demo.yaml --address auto"
    args = build_parser().parse_args(shlex.split(entry)[3:])
    assert args.command == "run" and args.address == "auto" and args.overrides == []
    assert jobs.build_entrypoint("my spec.yaml", command="resume") == "python -m isosweep.cli resume 'my spec.yaml' --address auto"
    assert jobs.build_entrypoint("x.yaml", command="validate") == "python -m isosweep.cli validate x.yaml"
    # `submit --resume --set ...`: the resume may take the asked-for changes (results-changing ones are still refused)
    assert jobs.build_entrypoint("x.yaml", command="resume", allow_changes=True).endswith("--address auto --allow-changes")
    assert jobs.build_entrypoint("x.yaml", command="resume", trust_storage=True).endswith("--address auto --trust-storage")
    assert "--trust-storage" not in jobs.build_entrypoint("x.yaml", command="run", trust_storage=True)
    assert build_parser().parse_args(["resume", "x", "--trust-storage"]).trust_storage  # what the job's command accepts
    assert cli.main(["submit", str(REPO / "search_spaces" / "demo.yaml"), "--trust-storage"]) == cli.EXIT_SPEC_ERROR  # no --resume
    shared = jobs.build_entrypoint("x.yaml", shared_fs=True)  # run's driver checks storage on a multi-node cluster too
    assert shared == "python -m isosweep.cli run x.yaml --address auto --shared-fs"
    assert build_parser().parse_args(shlex.split(shared)[3:]).shared_fs


def test_set_items_travel_in_the_environment_and_cli_main_applies_them(monkeypatch, capsys):
    """submit's --set goes into ISOSWEEP_OVERRIDES (quoting and '=' intact), and `isosweep validate` on the
    cluster side applies it after its own --set, so the environment's item wins for the same key."""
    env = jobs.job_runtime_env({}, {}, ["search.num_trials=7", "tracking.experiment=a b=c"])
    monkeypatch.setenv(OVERRIDES_ENV, env["env_vars"][OVERRIDES_ENV])
    code = cli.main(["validate", str(DEMO), "--no-path-checks", "--set", "search.num_trials=3", "--set", "search.seed=11"])
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert code == 0
    assert resolved["search"]["num_trials"] == 7  # after the command line's 3
    assert resolved["search"]["seed"] == 11  # the command line's own items still count
    assert resolved["tracking"]["experiment"] == "a b=c"
    # nothing of the user's to carry: only the stop wait
    assert jobs.job_runtime_env({}, {}, []) == {"env_vars": {jobs.JOB_STOP_WAIT_ENV: str(jobs.JOB_STOP_WAIT_S)}}

    monkeypatch.setenv(OVERRIDES_ENV, "search.num_trials=7")  # not JSON: refused, naming the variable
    assert cli.main(["validate", str(DEMO), "--no-path-checks"]) == 2
    assert "ISOSWEEP_OVERRIDES must be a JSON list" in capsys.readouterr().err


def test_address_precedence_follows_ray_job_submit(monkeypatch, no_address_env):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    assert jobs.resolve_address(None) == ("http://from-ray-address:8265", "RAY_ADDRESS")
    assert jobs.resolve_address("http://explicit:8265") == ("http://explicit:8265", "--address")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api-server:8265")
    assert jobs.resolve_address(None) == ("http://api-server:8265", "RAY_API_SERVER_ADDRESS")
    with pytest.raises(SpecError, match=r"neither --address nor RAY_ADDRESS .* export RAY_ADDRESS=http://HEAD:8265"):
        jobs.resolve_address("", environ={})
    with pytest.raises(jobs.JobSubmitError, match="RAY_ADDRESS head:6379 is the cluster's GCS port"):
        jobs.dashboard_address("head:6379", "RAY_ADDRESS")


def test_submit_takes_ray_address_and_an_explicit_address_wins(tmp_spec, monkeypatch, capsys, no_address_env):
    from_env = f"http://127.0.0.1:{free_port()}"  # nothing listens on either
    explicit = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", from_env)
    assert submit.submit_command(_submit_args(tmp_spec, None, "--token", "x", "--shared-fs")) == 1
    assert f"cannot reach a Ray dashboard at {from_env} (from RAY_ADDRESS)" in capsys.readouterr().err
    # the client is built with the explicit address even though RAY_ADDRESS is set (Ray's client would prefer it)
    assert submit.submit_command(_submit_args(tmp_spec, explicit, "--token", "x", "--shared-fs")) == 1
    assert f"cannot reach a Ray dashboard at {explicit} (from --address)" in capsys.readouterr().err


def test_no_address_anywhere_exits_2_naming_both(tmp_spec, capsys, no_address_env):
    assert cli.main(["submit", str(tmp_spec), "--shared-fs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Ray cluster to submit to") and "--address" in err and "RAY_ADDRESS" in err


def test_env_items_from_the_command_line_and_from_this_shell():
    args = build_parser().parse_args(["submit", "s.yaml", "--env", "A=1", "--env", "FROM_SHELL", "--env", "C=x=y", "--env", "D="])
    shell = {"FROM_SHELL": "shell value", "A": "ignored: A has a value"}
    assert jobs.parse_env_items(args.env_items, shell) == {"A": "1", "FROM_SHELL": "shell value", "C": "x=y", "D": ""}
    assert jobs.parse_env_items(["A=1", "A=2"], {}) == {"A": "2"}
    with pytest.raises(SpecError, match=r"--env MISSING: MISSING is not set in this shell.*export MISSING="):
        jobs.parse_env_items(["MISSING"], shell)
    for bad in ("1A=2", "A-B=1", "=x"):
        with pytest.raises(SpecError, match="not an environment variable name"):
            jobs.parse_env_items([bad], {})


def test_runtime_env_file_is_merged_and_env_wins(tmp_path, tmp_spec):
    file = tmp_path / "rt.yaml"
    file.write_text(yaml.safe_dump({
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "LEVEL": "from-file"},
        "pip": ["einops"], "excludes": ["big/"],
    }))
    user = jobs.job_runtime_env(jobs.load_runtime_env(file), {"LEVEL": "from-env"}, ["search.num_trials=2"])
    assert user["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "LEVEL": "from-env",
                                OVERRIDES_ENV: json.dumps(["search.num_trials=2"]), jobs.JOB_STOP_WAIT_ENV: str(jobs.JOB_STOP_WAIT_S)}
    # `ray job stop` leaves a sweep time to stop at a safe point, unless the user says otherwise
    assert jobs.job_runtime_env({"env_vars": {jobs.JOB_STOP_WAIT_ENV: "30"}}, {}, [])["env_vars"] == {jobs.JOB_STOP_WAIT_ENV: "30"}
    pkg = jobs.build_package(tmp_spec, user)
    try:
        env = pkg.runtime_env
        assert env["pip"] == ["einops"] and env["env_vars"] == user["env_vars"]
        assert env["py_modules"] == [str(REPO / "isosweep")] and env["working_dir"] == str(pkg.staging_dir)
        assert "big/" in env["excludes"] and "__pycache__/" in env["excludes"]
    finally:
        import shutil

        shutil.rmtree(pkg.staging_dir)
    as_json = tmp_path / "rt.json"  # JSON, as `ray job submit --runtime-env` also takes
    as_json.write_text(json.dumps({"env_vars": {"A": "1"}}))
    assert jobs.load_runtime_env(as_json) == {"env_vars": {"A": "1"}}


@pytest.mark.parametrize("content, message", [
    ({"working_dir": "."}, r"sets working_dir, which isosweep sets itself: .* carry the isosweep code"),
    ({"py_modules": ["mypkg"]}, r"sets py_modules, which isosweep sets itself"),
    ({"env_vars": {"OMP_NUM_THREADS": 4}}, r"env_vars must map names to strings"),
    (["pip"], r"not a mapping"),
])
def test_runtime_env_file_refusals(tmp_path, content, message):
    file = tmp_path / "rt.yaml"
    file.write_text(yaml.safe_dump(content))
    with pytest.raises(SpecError, match=message):
        jobs.load_runtime_env(file)


def test_runtime_env_file_with_working_dir_is_refused_before_any_connection(tmp_spec, tmp_path, capsys, no_address_env):
    file = tmp_path / "rt.yaml"
    file.write_text("working_dir: /somewhere\n")
    code = cli.main(["submit", str(tmp_spec), "--address", f"http://127.0.0.1:{free_port()}", "--token", "x",
                     "--shared-fs", "--runtime-env", str(file)])
    err = capsys.readouterr().err
    assert code == 2 and "working_dir" in err and "cannot reach" not in err
    with pytest.raises(SpecError, match="ISOSWEEP_OVERRIDES is isosweep's own variable"):
        jobs.job_runtime_env({}, {"ISOSWEEP_OVERRIDES": "[]"}, [])


def _check(tmp_path: Path, sets: list[str], env_vars: dict[str, str] | None = None, shared_fs: bool = False) -> None:
    spec = load_spec(DEMO, [f"storage.path={tmp_path}", *sets], check_paths=False)
    jobs.check_shared_places(spec, env_vars or {}, shared_fs, "spec.yaml")


def test_places_only_one_machine_sees_are_refused_unless_shared_fs(tmp_path):
    server = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    s3 = "storage.path=s3://bucket/prefix?endpoint_override=10.0.0.2:9000&scheme=http"
    _check(tmp_path, [s3], server)  # both reachable from every node: fine
    _check(tmp_path, [s3, "tracking.uri=https://mlflow.example.com"])

    with pytest.raises(SpecError, match=r"spec.yaml: field 'storage.path': the storage path '/.*' is a local path .*--shared-fs"):
        _check(tmp_path, [], server)
    _check(tmp_path, [], server, shared_fs=True)  # an absolute path every node mounts
    for rel in ("runs", "./runs"):  # relative: the job's temporary working directory, shared file system or not
        with pytest.raises(SpecError, match=r"field 'storage.path': .* relative path .*temporary working directory.*s3://.*absolute path on the shared"):
            _check(tmp_path, [f"storage.path={rel}"], server, shared_fs=True)

    # no tracking URI at all: the job's SQLite fallback lives on the head
    with pytest.raises(SpecError, match=r"field 'tracking.uri': no tracking URI .*--env MLFLOW_TRACKING_URI=http://"):
        _check(tmp_path, [s3])
    _check(tmp_path, [], shared_fs=True)  # sqlite under the shared storage path
    with pytest.raises(SpecError, match="no tracking URI"):  # with s3 storage the fallback is ./isosweep-mlflow
        _check(tmp_path, [s3], shared_fs=True)

    db = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(SpecError, match=r"field 'tracking.uri': the tracking URI 'sqlite:///.*' is a file on one machine"):
        _check(tmp_path, [s3, f"tracking.uri={db}"], server)  # the spec's URI wins over MLFLOW_TRACKING_URI
    _check(tmp_path, [s3, f"tracking.uri={db}"], shared_fs=True)
    with pytest.raises(SpecError, match=r"field 'MLFLOW_TRACKING_URI': .*file on one machine"):
        _check(tmp_path, [s3], {"MLFLOW_TRACKING_URI": db})
    with pytest.raises(SpecError, match="field 'tracking.uri'"):  # relative sqlite: never, even on a shared fs
        _check(tmp_path, ["tracking.uri=sqlite:///runs/mlflow.db"], shared_fs=True)


def test_submit_refuses_the_default_local_storage_with_exit_2_before_connecting(tmp_path, capsys, no_address_env):
    spec = tmp_path / "local.yaml"
    spec.write_text("name: local\n")  # storage.path defaults to the relative `runs`
    address = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["submit", str(spec), "--address", address, "--token", "x"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "field 'storage.path'" in err and "cannot reach" not in err
    # the tracking URI from --env counts: with shared storage it is all that was missing
    code = cli.main(["submit", str(spec), "--address", address, "--token", "x",
                     "--set", "storage.path=s3://bucket/p", "--env", "MLFLOW_TRACKING_URI=http://mlflow:5000"])
    assert code == 1 and "cannot reach a Ray dashboard" in capsys.readouterr().err


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
    code = submit.submit_command(_submit_args(tmp_spec, address, "--token", "x", "--shared-fs"))
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach a Ray dashboard at {address}" in err and "ray dashboard" in err


def test_cli_dispatches_submit_and_returns_its_status(tmp_spec, capsys):
    code = cli.main(["submit", str(tmp_spec), "--address", f"127.0.0.1:{free_port()}", "--token", "x", "--shared-fs"])
    assert code == 1 and "cannot reach a Ray dashboard" in capsys.readouterr().err


# The storage and tracking check of _start_ray (several nodes, by address) is not what these tests are about.
NO_PLACE_CHECK = {"storage": None, "tracking_uri": "", "shared_fs": True}


def test_joining_by_address_warns_where_an_embedded_run_fails(monkeypatch, capsys):
    """`isosweep run`'s Ray start (driver.start_ray): a trial bigger than the cluster stops a local run, but by
    address it only warns (an autoscaler may add nodes); a trial that fits passes quietly; the address is what
    init_ray joins. Ray itself is replaced by a 3-CPU stand-in; the slow test below uses a real cluster."""
    from isosweep.sweep import driver

    joined = []
    monkeypatch.setattr(driver, "init_ray", lambda address, dashboard=True: joined.append(address) or {})
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 3.0})
    too_big = load_spec(DEMO, ["resources.workers_per_trial=2", "resources.cpus_per_worker=2"], check_paths=False)
    with pytest.raises(SpecError, match="one trial needs 4 CPUs .* the cluster has 3"):
        driver.start_ray(too_big, "big.yaml", None, dashboard=False, **NO_PLACE_CHECK)
    driver.start_ray(too_big, "big.yaml", "10.0.0.1:6379", dashboard=False, **NO_PLACE_CHECK)
    out = capsys.readouterr().out
    assert "warning: big.yaml: field 'resources': one trial needs 4 CPUs" in out and "autoscaler" in out
    fits = load_spec(DEMO, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1.5"], check_paths=False)
    for address in (None, "10.0.0.1:6379"):
        driver.start_ray(fits, "fits.yaml", address, dashboard=False, **NO_PLACE_CHECK)
    assert "warning" not in capsys.readouterr().out
    assert joined == [None, "10.0.0.1:6379", None, "10.0.0.1:6379"]


# ----------------------------------------------------------------------------------------------------
# slow: a real multi-node cluster


# Run by `test_run_by_address_joins_the_cluster_and_sizes_trials_from_all_nodes` in its own process (a driver
# joined to a cluster stays joined): isosweep's own Ray start, as `isosweep run --address ADDRESS` does it.
JOIN_BY_ADDRESS = """
import json, ray
from isosweep.spec import load_spec
from isosweep.sweep.driver import start_ray
from isosweep.sweep.resources import max_concurrent

address, demo = {address!r}, {demo!r}
fits = load_spec(demo, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1"], check_paths=False)
start_ray(fits, "fits.yaml", address, dashboard=False, storage=None, tracking_uri="", shared_fs=True)  # 2 CPUs: more than any one node has, what both workers have
too_big = load_spec(demo, ["resources.workers_per_trial=2", "resources.cpus_per_worker=1.5"], check_paths=False)
start_ray(too_big, "too_big.yaml", address, dashboard=False, storage=None, tracking_uri="", shared_fs=True)  # 3 CPUs: by address a warning, not an error
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
    r = subprocess.run([sys.executable, "-c", code], check=False, env=cluster.env, capture_output=True, text=True, timeout=180)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, f"driver failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    out = json.loads(line[len("RESULT "):])
    assert out["nodes"] == 3 and out["cpus"] == 2.0  # head 0 + two workers of 1: the fixture's cluster, joined
    assert out["gcs"].rpartition(":")[2] == cluster.address.rpartition(":")[2]  # its GCS (nodes report their own IP)
    assert out["concurrent"] == 2  # one 1-CPU trial per CPU of the worker nodes
    assert "fits.yaml" not in r.stdout  # the 2-CPU trial fits the two worker nodes together: no warning
    assert "warning: too_big.yaml: field 'resources': one trial needs 3 CPUs" in r.stdout and "autoscaler" in r.stdout


@pytest.mark.slow
def test_run_by_address_refuses_storage_only_this_machine_sees(ray_cluster, tmp_path):
    """`isosweep run --address` on a multi-node cluster with the default relative storage and a SQLite
    tracking store: refused at once (before any preparation), naming both and the fix; --shared-fs would
    allow it (the by-address sweep test in test_sweep.py runs that way)."""
    r = subprocess.run([sys.executable, "-m", "isosweep", "run", str(DEMO), "--address", ray_cluster.address],
                       check=False, env=ray_cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"the storage path '{tmp_path / 'runs'}' is a local path on one machine" in r.stderr
    assert "the tracking URI 'sqlite:" in r.stderr and "--shared-fs" in r.stderr and "s3://" in r.stderr
    assert "preparing the built-in base model" not in r.stdout + r.stderr  # refused before minutes of preparation
    assert not list(tmp_path.glob("runs/demo-*"))  # and nothing was left behind as a sweep


@pytest.mark.slow
def test_submit_validate_job_succeeds_and_streams_its_output(ray_cluster, tmp_path, capsys):
    cluster = ray_cluster
    if not DEMO.exists():
        pytest.skip("search_spaces/demo.yaml is missing (the checkout-shipping path needs a spec in the repo)")
    spec = DEMO
    # --shared-fs is true of this cluster: all its nodes are this machine
    args = _submit_args(spec, cluster.dashboard_url, "--token", cluster.token, "--set", "search.num_trials=3",
                        "--set", f"storage.path={tmp_path}", "--shared-fs")
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
def test_submitted_job_gets_env_and_overrides_from_its_runtime_env_not_its_entrypoint(ray_cluster, tmp_spec, monkeypatch, capsys):
    """--env values (one given, one from this shell) and --set values reach the job through its runtime env: the
    entrypoint Ray stores and shows holds neither, submit prints their names only, and the job applies the override."""
    cluster = ray_cluster
    secret, experiment = f"s3cr3t-{secrets.token_hex(8)}", f"exp-{secrets.token_hex(6)}"
    monkeypatch.setenv("ISOSWEEP_TEST_FROM_SHELL", "shell-value")
    args = _submit_args(tmp_spec, cluster.dashboard_url, "--token", cluster.token, "--shared-fs",
                        "--env", f"SOME_SECRET={secret}", "--env", "ISOSWEEP_TEST_FROM_SHELL",
                        "--set", f"tracking.experiment={experiment}")
    code = submit.submit_command(args, command="validate")
    out, err = capsys.readouterr()
    assert code == 0, f"job failed:\n{out[-3000:]}\n{err[-3000:]}"
    assert secret not in out + err
    # submit's own lines (the job's streamed output, the resolved spec, follows them and may show the override)
    own = [l for l in out.splitlines() if l.split(":")[0] in ("submitted job", "entrypoint", "env", "--set", "dashboard", "logs", "stop")]
    assert "env:           ISOSWEEP_TEST_FROM_SHELL SOME_SECRET (values not shown)" in own
    assert any(l.startswith("--set:         tracking.experiment (values not shown") for l in own)
    assert not any(experiment in l or "shell-value" in l for l in own)

    client = jobs.connect(cluster.dashboard_url, cluster.token)
    job_id = next(l.split()[-1] for l in own if l.startswith("submitted job:"))
    info = client.get_job_info(job_id)
    assert info.entrypoint == f"python -m isosweep.cli validate {tmp_spec.name}"  # nothing else: no values
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["SOME_SECRET"] == secret and env_vars["ISOSWEEP_TEST_FROM_SHELL"] == "shell-value"
    assert json.loads(env_vars[OVERRIDES_ENV]) == [f"tracking.experiment={experiment}"]
    assert str(info.status.value) == "SUCCEEDED"
    assert f"experiment: {experiment}" in client.get_job_logs(job_id)  # `isosweep validate` applied it on the cluster


@pytest.mark.slow
def test_submit_with_token_from_env_and_no_wait(ray_cluster, tmp_spec, monkeypatch, capsys):
    cluster = ray_cluster
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url, "--no-wait", "--shared-fs"), command="validate")
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
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url, "--token", "wrong", "--shared-fs"), command="validate")
    err = capsys.readouterr().err
    assert code == 1
    assert "rejected the auth token from --token" in err and "ray get-auth-token" in err and "RAY_AUTH_TOKEN" in err

    # no token anywhere: not in the environment, and `ray get-auth-token` finds none (empty HOME)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = submit.submit_command(_submit_args(tmp_spec, cluster.dashboard_url, "--shared-fs"), command="validate")
    err = capsys.readouterr().err
    assert code == 1
    assert "requires an auth token and none was sent" in err and "--token" in err


@pytest.mark.slow
def test_a_failing_job_returns_its_exit_code_and_the_cluster_checks_paths(ray_cluster, tmp_path, capsys):
    cluster = ray_cluster
    spec = tmp_path / "nodata.yaml"
    spec.write_text(yaml.safe_dump({"name": "nodata", "dataset": {"kind": "image_folder", "path": "/no/such/images"},
                                    "storage": {"path": str(tmp_path / "runs")}}))
    # valid locally (paths are the cluster's), invalid on the cluster: `isosweep validate` exits 2 there
    args = _submit_args(spec, cluster.dashboard_url, "--token", cluster.token, "--shared-fs")
    code = submit.submit_command(args, command="validate")
    out, err = capsys.readouterr()
    assert code == 2, out[-2000:] + err[-2000:]
    assert "FAILED" in err and "dataset.path" in out + err


def test_the_worker_environment_leaves_out_what_a_submitted_job_sets(monkeypatch):
    """`isosweep run --address` inside a job: Ray refuses a driver runtime env that sets a variable the job's
    runtime env sets too, so those are left to the job (its value wins) and the rest still reach the workers."""
    import json

    from isosweep.sweep.ray_env import _not_set_by_the_job

    wanted = {"TQDM_MININTERVAL": "15", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _not_set_by_the_job(wanted) == wanted
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"TQDM_MININTERVAL": "1"}}}))
    assert _not_set_by_the_job(wanted) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
