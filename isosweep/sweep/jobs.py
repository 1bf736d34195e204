"""`isosweep submit`: run a sweep on a remote Ray cluster as a Ray job (Ray Jobs API).

The spec is validated here first (schema only: `dataset.path` and other paths name the cluster's
disks, so they are checked by the job itself on the cluster). The package and the spec travel in the
job's runtime environment; the cluster's nodes must already have the dependencies (torch with CUDA,
diffusers, ray, mlflow...), as `clusters/aws-gpu.yaml` and the KubeRay image provide. The job's
entrypoint is `python -m isosweep.cli run|resume SPEC --address auto` and nothing else, so the shipped
code, not whatever isosweep version the nodes have installed, runs the sweep, and the driver joins the
cluster it was submitted to instead of starting an embedded Ray.

Nothing the user passes as a value goes into the entrypoint, which Ray shows in the dashboard, in
`ray job list` and in its job table: `--set` items travel in the job's environment as
`ISOSWEEP_OVERRIDES` (a JSON list that `cli.main` appends to the command line's `--set`), and `--env`
values in the runtime env's `env_vars`, as `ray job submit --runtime-env` puts them.

The address is `--address`, then `RAY_API_SERVER_ADDRESS`, then `RAY_ADDRESS` (the order `ray job
submit` uses); the client is then built with that address explicitly.

Auth (Ray >= 2.52): a cluster started with `RAY_AUTH_MODE=token` rejects dashboard and Jobs API
requests without `Authorization: Bearer TOKEN` (401) or with the wrong token (403). The token comes
from `--token`, then `RAY_AUTH_TOKEN`, then `ray get-auth-token` (which also reads
`RAY_AUTH_TOKEN_PATH` and `~/.ray/auth_token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

import isosweep
from isosweep.console import note
from isosweep.constants import OVERRIDES_ENV, STORAGE_ENV, TRACKING_URI_ENV  # OVERRIDES_ENV: a job's --set items
from isosweep.redact import scrub_text
from isosweep.spec import SpecError, SweepSpec, resolve_spec_data, spec_chain
from isosweep.storage import is_remote, machine_local_reason

# Never shipped with the job: environments, results, data, weights and caches (gitignore syntax,
# relative to the working directory). Ray also honours the repository's .gitignore.
RUNTIME_ENV_EXCLUDES = [
    ".venv/", "venv/", ".git/", "runs/", "mlruns/", "data/", "report/", "reports/",
    "__pycache__/", ".pytest_cache/", "*.egg-info/", "build/", "dist/", ".whl/",
    "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.bin", "*.npz", "*.db",
]

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

# Where the address comes from when --address is not given, in `ray job submit`'s order.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

# Runtime-env fields isosweep sets itself: the shipped code and spec. A second working_dir would replace
# the code the job runs, and extra py_modules could shadow the shipped package.
OWN_RUNTIME_ENV_FIELDS = ("working_dir", "py_modules")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

TOKEN_HELP = (
    "The cluster runs with token authentication (RAY_AUTH_MODE=token): every dashboard and Jobs API "
    "request must carry its token. Get it where the cluster was started: `ray get-auth-token` on the head "
    "node (e.g. `ray exec clusters/aws-gpu.yaml 'ray get-auth-token'`), or on KubeRay "
    "`kubectl get secret RAYCLUSTER-NAME -o jsonpath='{.data.auth_token}' | base64 -d`. "
    "Then pass it with --token TOKEN, or export RAY_AUTH_TOKEN=TOKEN (or RAY_AUTH_TOKEN_PATH=FILE)."
)


class JobSubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says what failed and how to fix it."""


@dataclass
class JobPackage:
    """What travels with the job: the runtime env and the spec path as the job will see it."""

    runtime_env: dict[str, Any]
    spec_arg: str  # relative to the job's working directory
    staging_dir: Path | None = None  # temporary folder to delete once the upload is done


# ----------------------------------------------------------------------------------------------------
# address and token


def resolve_address(explicit: str | None, environ: Any = None) -> tuple[str, str]:
    """(address, where it came from): --address, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS.

    Neither given is a SpecError (exit 2) that names both and the fix.
    """
    environ = os.environ if environ is None else environ
    if explicit and explicit.strip():
        return explicit.strip(), "--address"
    for var in ADDRESS_ENV:
        value = environ.get(var, "").strip()
        if value:
            return value, var
    raise SpecError(
        "no Ray cluster to submit to: neither --address nor RAY_ADDRESS (or RAY_API_SERVER_ADDRESS) is set. "
        "Fix: --address http://HEAD:8265, or export RAY_ADDRESS=http://HEAD:8265 (the dashboard; "
        "`ray dashboard clusters/aws-gpu.yaml` forwards it to http://127.0.0.1:8265)"
    )


def dashboard_address(address: str, source: str = "--address") -> str:
    """Normalise an address to what JobSubmissionClient takes: `http(s)://HOST:PORT`, `ray://...`, `auto`.

    A bare `HOST:PORT` gets `http://`. The GCS port (6379) is refused with a hint: the Jobs API is
    served by the dashboard (8265 by default), not by the GCS. `source` names where the address came
    from (--address, RAY_ADDRESS...) in that message.
    """
    address = address.strip().rstrip("/")
    if address == "auto" or "://" in address:
        return address
    host, _, port = address.rpartition(":")
    if port == "6379":
        raise JobSubmitError(
            f"{source} {address} is the cluster's GCS port; the Jobs API is on the dashboard port. "
            f"Fix: --address http://{host or 'HEAD'}:8265 (or `ray dashboard CLUSTER.yaml` and http://127.0.0.1:8265)"
        )
    return f"http://{address}"


def _ray_executable() -> str | None:
    here = Path(sys.executable).with_name("ray")  # the ray of this interpreter's environment first
    return str(here) if here.is_file() else shutil.which("ray")


def resolve_token(explicit: str | None = None) -> tuple[str | None, str]:
    """The auth token and where it came from: --token, RAY_AUTH_TOKEN, `ray get-auth-token`, or none."""
    if explicit:
        return explicit.strip(), "--token"
    env_token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_token:
        return env_token, "RAY_AUTH_TOKEN"
    ray_bin = _ray_executable()
    if ray_bin:
        try:
            out = subprocess.run([ray_bin, "get-auth-token"], check=False, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip(), "`ray get-auth-token`"
    return None, "none found"


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument;
    `resolve_address` has already applied them in their place (after --address), so hide them while the
    client is built: the client gets exactly the address that was resolved and printed."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token: str | None, token_source: str = "--token", address_source: str = "--address") -> Any:
    """A JobSubmissionClient for the dashboard at `address`, or a JobSubmitError that says why not.

    Construction already asks the dashboard for its version, so an unreachable address or a rejected
    token fails here, before anything is uploaded.
    """
    url = dashboard_address(address, address_source)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        text = str(exc)
        if "Authentication required" in text or "401" in text or not token:
            what = f"the Ray cluster at {url} requires an auth token and none was sent (looked in --token, RAY_AUTH_TOKEN, `ray get-auth-token`)."
        else:
            what = f"the Ray cluster at {url} rejected the auth token from {token_source} (403: wrong token for this cluster)."
        raise JobSubmitError(f"{what} {TOKEN_HELP}") from None
    except ConnectionError:
        raise JobSubmitError(
            f"cannot reach a Ray dashboard at {url} (from {address_source}). Fix: check the cluster is up (`ray status` on the head), "
            "that the address is the dashboard (http://HEAD:8265, not the GCS port 6379), and that the port is "
            "reachable from here: `ray dashboard clusters/aws-gpu.yaml` forwards it to http://127.0.0.1:8265, "
            "`kubectl port-forward svc/RAYCLUSTER-head-svc 8265:8265` does on KubeRay."
        ) from None
    except RuntimeError as exc:  # e.g. a 404 on /api/version: something else listens there
        raise JobSubmitError(f"{url} did not answer as a Ray dashboard ({exc}). Fix: point --address at http://HEAD:8265") from None


# ----------------------------------------------------------------------------------------------------
# what the job runs


def package_root() -> Path:
    """The folder holding the `isosweep` package (the repository root in a checkout)."""
    return Path(isosweep.__file__).resolve().parent.parent


def build_package(spec_path: str | os.PathLike, user_env: dict[str, Any] | None = None) -> JobPackage:
    """The runtime env that ships the code and the spec, with `user_env` (from `job_runtime_env`) merged in.

    From a checkout, with the spec inside it: the checkout is the working directory (minus
    RUNTIME_ENV_EXCLUDES), so specs and relative paths behave as they do locally. Otherwise (an
    installed package, or a spec from elsewhere, or a parent it `extends` from elsewhere) the package goes as a
    py_module and the spec alone as the working directory, merged with its parents so none needs to travel. The
    user's `excludes` are added to ours; their other fields (env_vars, pip...) pass through; they never hold
    working_dir or py_modules (`load_runtime_env` refuses them).
    """
    user_env = dict(user_env or {})
    if set(user_env) & set(OWN_RUNTIME_ENV_FIELDS):
        raise ValueError(f"user_env may not set {OWN_RUNTIME_ENV_FIELDS}: isosweep ships the code and the spec there")
    spec = Path(spec_path).resolve()
    root = package_root()
    in_checkout = (root / "pyproject.toml").is_file() and (root / "isosweep" / "__init__.py").is_file()
    chain = spec_chain(spec)  # the spec and the parents it extends: all travel with the checkout, or merged into one
    if in_checkout and all(p.resolve().is_relative_to(root) for p in chain):
        env = {"working_dir": str(root), "excludes": list(RUNTIME_ENV_EXCLUDES)}
        package = JobPackage(runtime_env=env, spec_arg=spec.relative_to(root).as_posix())
    else:
        staging = Path(tempfile.mkdtemp(prefix="isosweep-job-"))
        if len(chain) == 1:
            shutil.copy2(spec, staging / spec.name)
        else:  # the parents stay here: the job gets the merged spec, which extends nothing
            (staging / spec.name).write_text(yaml.safe_dump(resolve_spec_data(spec), sort_keys=False))
        env = {"working_dir": str(staging), "py_modules": [str(Path(isosweep.__file__).resolve().parent)],
               "excludes": ["__pycache__/", "*.pyc"]}
        package = JobPackage(runtime_env=env, spec_arg=spec.name, staging_dir=staging)
    package.runtime_env["excludes"] += list(user_env.pop("excludes", None) or [])
    package.runtime_env.update(user_env)
    return package


def build_entrypoint(spec_arg: str, command: str = "run", shared_fs: bool = False, allow_changes: bool = False,
                     trust_storage: bool = False) -> str:
    """The shell command the job runs: `python -m isosweep.cli run SPEC --address auto [--shared-fs]`.

    Only the command, the spec's path and flags: `--set` values travel in OVERRIDES_ENV, never here, since
    Ray shows the entrypoint to everyone who can list the cluster's jobs. `--shared-fs` goes on to
    run/resume, whose driver makes the same storage check on a multi-node cluster.
    """
    parts = ["python", "-m", "isosweep.cli", command, spec_arg]
    if command in ("run", "resume", "train"):
        parts += ["--address", "auto"]  # join the cluster the job runs on; never an embedded Ray
    if shared_fs and command in ("run", "resume"):
        parts.append("--shared-fs")
    if command == "resume":  # `--set K=V` asks for changes (those that change results are refused all the same);
        parts += ["--allow-changes"] * allow_changes + ["--trust-storage"] * trust_storage  # the user vouches for the bucket
    return shlex.join(parts)


def parse_env_items(items: list[str], environ: Any = None) -> dict[str, str]:
    """`--env KEY=VALUE` / `--env KEY` items as a dict; a bare KEY takes its value from `environ`
    (this shell's environment by default). A bad name or an unset KEY is a SpecError (exit 2).

    Later items win over earlier ones with the same KEY, as repeated shell assignments do.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not _ENV_NAME.match(key):
            raise SpecError(
                f"--env {scrub_text(key)!r}: not an environment variable name (letters, digits and _, not starting "
                "with a digit); fix: --env KEY=VALUE, or --env KEY to pass KEY's value from this shell"
            )
        if not sep:
            if key not in environ:
                raise SpecError(
                    f"--env {key}: {key} is not set in this shell, so there is no value to pass; fix: "
                    f"export {key}=... before submitting (keeps the value out of your shell history), or --env {key}=VALUE"
                )
            value = environ[key]
        out[key] = value
    return out


def load_runtime_env(path: str | os.PathLike) -> dict[str, Any]:
    """A `--runtime-env` file (YAML or JSON, as `ray job submit --runtime-env` takes) as a dict.

    Refused with a SpecError (exit 2): a missing or unparseable file, a file that is not a mapping,
    `env_vars` that are not strings, and working_dir / py_modules, which isosweep sets itself.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"--runtime-env {path}: no such file; fix: give a YAML or JSON runtime_env file")
    try:
        env = yaml.safe_load(path.read_text()) or {}  # YAML 1.1 reads JSON too
    except yaml.YAMLError as exc:
        raise SpecError(f"--runtime-env {path}: neither YAML nor JSON: {scrub_text(str(exc))}") from None
    if not isinstance(env, dict):
        raise SpecError(f"--runtime-env {path}: not a mapping of runtime_env fields (env_vars, pip, ...)")
    own = [k for k in OWN_RUNTIME_ENV_FIELDS if k in env]
    if own:
        raise SpecError(
            f"--runtime-env {path}: sets {' and '.join(own)}, which isosweep sets itself: the job's working_dir "
            "and py_modules carry the isosweep code and the spec it runs, and another would replace or shadow them. "
            f"Fix: remove {' and '.join(own)} from the file; install other packages with its pip field"
        )
    env_vars = env.get("env_vars", {}) or {}
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        raise SpecError(
            f"--runtime-env {path}: env_vars must map names to strings (Ray passes them to the job as they are); "
            "fix: quote numbers and booleans, e.g. OMP_NUM_THREADS: \"4\""
        )
    if "excludes" in env and not isinstance(env["excludes"], list):
        raise SpecError(f"--runtime-env {path}: excludes must be a list of gitignore-style patterns")
    return env


JOB_STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's job supervisor: seconds from `ray job stop`'s SIGTERM to SIGKILL
JOB_STOP_WAIT_S = 120  # Ray's default 3 s is too short for a sweep to stop its trials and record INTERRUPTED


def job_runtime_env(file_env: dict[str, Any] | None, env_items: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """The user's part of the job's runtime env: the `--runtime-env` file, its env_vars updated by `--env`
    (which wins), the `--set` items as OVERRIDES_ENV, and JOB_STOP_WAIT_ENV unless the user sets it. `build_package`
    adds the code and the spec."""
    env = dict(file_env or {})
    env_vars = {JOB_STOP_WAIT_ENV: str(JOB_STOP_WAIT_S), **(env.get("env_vars") or {}), **env_items}
    if OVERRIDES_ENV in env_vars:
        raise SpecError(f"{OVERRIDES_ENV} is isosweep's own variable for --set items; fix: pass them with --set KEY=VALUE")
    if overrides:
        env_vars[OVERRIDES_ENV] = json.dumps(list(overrides))
    env["env_vars"] = env_vars  # never empty: it holds the stop wait
    return env


def _relative_local(uri: str) -> bool:
    """A path (or sqlite:/file: URI) relative to the current directory: in a job, the job's own
    temporary working directory, which no other node and no later job sees, shared file system or not."""
    text = str(uri)
    if text.startswith("sqlite:///"):
        return not text[len("sqlite:///"):].startswith("/")
    if text.startswith("file://"):
        return False
    if text.startswith(("sqlite:", "file:")) or is_remote(text):
        return False
    return not os.path.isabs(os.path.expanduser(text))


def check_shared_places(spec: SweepSpec, env_vars: dict[str, str], shared_fs: bool, source: str) -> None:
    """Refuse (SpecError, exit 2) a storage path or tracking URI that only one machine can see.

    The job's storage is ISOSWEEP_STORAGE from its env_vars, else the spec's; its tracking URI is ISOSWEEP_TRACKING_URI
    from them, the spec's `tracking.uri`, MLFLOW_TRACKING_URI from them, else none: a SQLite file on the head. With
    `shared_fs` the user states that every node mounts the same file system, so absolute local paths and
    sqlite:/file: URIs pass; relative ones never do (they resolve inside the job's temporary working
    directory).
    """
    storage, s_field = (env_vars[STORAGE_ENV], STORAGE_ENV) if env_vars.get(STORAGE_ENV) else (spec.storage.path, "storage.path")
    reason = machine_local_reason(storage, "storage")
    if reason and (not shared_fs or _relative_local(storage)):
        why = ("it would resolve inside the job's temporary working directory" if shared_fs
               else "Tune's trial workers on other nodes cannot write there")
        raise SpecError(scrub_text(
            f"{source}: field '{s_field}': {reason}; {why}. Fix: --set storage.path=s3://BUCKET/PREFIX, or an absolute "
            "path" + (" on the shared file system" if shared_fs else " plus --shared-fs if every node mounts the same file system there")
        ))
    field, uri = next(((f, u) for f, u in ((TRACKING_URI_ENV, env_vars.get(TRACKING_URI_ENV)), ("tracking.uri", spec.tracking.uri),
                                          ("MLFLOW_TRACKING_URI", env_vars.get("MLFLOW_TRACKING_URI"))) if u), ("", None))
    fix = ("Fix: set tracking.uri (or --env MLFLOW_TRACKING_URI=http://MLFLOW_HOST:5000) to a tracking server every "
           "node reaches; if the nodes set MLFLOW_TRACKING_URI themselves (the KubeRay manifests do), pass the same "
           "URI with --env")
    if not uri:
        if not shared_fs or is_remote(storage):  # the fallback is sqlite on the head, or ./isosweep-mlflow for s3
            raise SpecError(
                f"{source}: field 'tracking.uri': no tracking URI (neither tracking.uri nor MLFLOW_TRACKING_URI in "
                "--env/--runtime-env), so the job would fall back to a SQLite file on the head node that trials on "
                f"other nodes cannot write to. {fix}" + ("" if shared_fs else ", or --shared-fs if every node mounts the storage path")
            )
        return
    reason = machine_local_reason(uri, "tracking")
    if reason and (not shared_fs or _relative_local(uri)):
        raise SpecError(scrub_text(
            f"{source}: field '{field}': {reason}, which trials on other nodes cannot reach. {fix}"
            + ("" if shared_fs else ", or --shared-fs if every node mounts that file at the same path")
        ))


def submission_id_for(spec: SweepSpec) -> str:
    """A readable, unique job id: isosweep-NAME-YYYYmmdd-HHMMSS-XXXX."""
    return f"isosweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    client: Any, entrypoint: str, package: JobPackage, spec: SweepSpec | None = None,
    submission_id: str | None = None,
) -> str:
    """Upload the package and submit; returns the submission id. Cleans up the staging folder."""
    metadata = {"isosweep": "1"}
    if spec is not None:
        metadata["sweep"] = spec.name
    try:
        return client.submit_job(
            entrypoint=entrypoint, runtime_env=package.runtime_env, metadata=metadata,
            submission_id=submission_id or (submission_id_for(spec) if spec else None),
        )
    except ValueError as exc:  # e.g. the package is over Ray's upload limit
        raise JobSubmitError(
            f"could not package the job: {exc}. Fix: keep data, runs and weights out of the checkout "
            "or list them in .gitignore/.rayignore"
        ) from None
    finally:
        if package.staging_dir is not None:
            shutil.rmtree(package.staging_dir, ignore_errors=True)


def follow(client: Any, job_id: str, out: Any = None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status name."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as exc:  # the log stream closed early (head restarted, proxy timeout): poll instead
        note(f"(log stream ended: {exc}; waiting for the job to finish)")
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATES:
            return status
        time.sleep(poll_s)


def job_exit_code(client: Any, job_id: str, status: str) -> int:
    """The driver's exit code where Ray knows it; else 0 for SUCCEEDED and 1 otherwise."""
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    return 0 if status == "SUCCEEDED" else 1


# ----------------------------------------------------------------------------------------------------
# the command
