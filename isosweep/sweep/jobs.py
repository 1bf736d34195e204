"""`isosweep submit`: run a sweep on a remote Ray cluster as a Ray job (Ray Jobs API).

The spec is validated here first (schema only: `dataset.path` and other paths name the cluster's
disks, so they are checked by the job itself on the cluster). The package and the spec travel in the
job's runtime environment; the cluster's nodes must already have the dependencies (torch with CUDA,
diffusers, ray, mlflow...), as `clusters/aws-gpu.yaml` and the KubeRay image provide. The job's
entrypoint is `python -m isosweep.cli run SPEC --address auto [--set ...]`, so the shipped code,
not whatever isosweep version the nodes have installed, runs the sweep, and the driver joins the
cluster it was submitted to instead of starting an embedded Ray.

Auth (Ray >= 2.52): a cluster started with `RAY_AUTH_MODE=token` rejects dashboard and Jobs API
requests without `Authorization: Bearer TOKEN` (401) or with the wrong token (403). The token comes
from `--token`, then `RAY_AUTH_TOKEN`, then `ray get-auth-token` (which also reads
`RAY_AUTH_TOKEN_PATH` and `~/.ray/auth_token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

import isosweep
from isosweep.config import SweepSpec

# Never shipped with the job: environments, results, data, weights and caches (gitignore syntax,
# relative to the working directory). Ray also honours the repository's .gitignore.
RUNTIME_ENV_EXCLUDES = [
    ".venv/", "venv/", ".git/", "runs/", "mlruns/", "data/", "report/", "reports/",
    "__pycache__/", ".pytest_cache/", "*.egg-info/", "build/", "dist/", ".whl/",
    "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.bin", "*.npz", "*.db",
]

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

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


def dashboard_address(address: str) -> str:
    """Normalise `--address` to what JobSubmissionClient takes: `http(s)://HOST:PORT`, `ray://...`, `auto`.

    A bare `HOST:PORT` gets `http://`. The GCS port (6379) is refused with a hint: the Jobs API is
    served by the dashboard (8265 by default), not by the GCS.
    """
    address = address.strip().rstrip("/")
    if address == "auto" or "://" in address:
        return address
    host, _, port = address.rpartition(":")
    if port == "6379":
        raise JobSubmitError(
            f"--address {address} is the cluster's GCS port; the Jobs API is on the dashboard port. "
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
            out = subprocess.run([ray_bin, "get-auth-token"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip(), "`ray get-auth-token`"
    return None, "none found"


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument;
    `isosweep submit` always has an explicit --address, so hide them while the client is built."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token: str | None, token_source: str = "--token") -> Any:
    """A JobSubmissionClient for the dashboard at `address`, or a JobSubmitError that says why not.

    Construction already asks the dashboard for its version, so an unreachable address or a rejected
    token fails here, before anything is uploaded.
    """
    url = dashboard_address(address)
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
            f"cannot reach a Ray dashboard at {url}. Fix: check the cluster is up (`ray status` on the head), "
            "that --address is the dashboard (http://HEAD:8265, not the GCS port 6379), and that the port is "
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


def build_package(spec_path: str | os.PathLike) -> JobPackage:
    """The runtime env that ships the code and the spec.

    From a checkout, with the spec inside it: the checkout is the working directory (minus
    RUNTIME_ENV_EXCLUDES), so specs and relative paths behave as they do locally. Otherwise (an
    installed package, or a spec from elsewhere) the package goes as a py_module and the spec alone
    as the working directory.
    """
    spec = Path(spec_path).resolve()
    root = package_root()
    in_checkout = (root / "pyproject.toml").is_file() and (root / "isosweep" / "__init__.py").is_file()
    if in_checkout and spec.is_relative_to(root):
        env = {"working_dir": str(root), "excludes": list(RUNTIME_ENV_EXCLUDES)}
        return JobPackage(runtime_env=env, spec_arg=spec.relative_to(root).as_posix())
    staging = Path(tempfile.mkdtemp(prefix="isosweep-job-"))
    shutil.copy2(spec, staging / spec.name)
    env = {
        "working_dir": str(staging),
        "py_modules": [str(Path(isosweep.__file__).resolve().parent)],
        "excludes": ["__pycache__/", "*.pyc"],
    }
    return JobPackage(runtime_env=env, spec_arg=spec.name, staging_dir=staging)


def build_entrypoint(spec_arg: str, overrides: list[str] | None = None, command: str = "run") -> str:
    """The shell command the job runs: `python -m isosweep.cli run SPEC --address auto [--set K=V ...]`."""
    parts = ["python", "-m", "isosweep.cli", command, spec_arg]
    if command in ("run", "resume", "train"):
        parts += ["--address", "auto"]  # join the cluster the job runs on; never an embedded Ray
    for item in overrides or []:
        parts += ["--set", item]
    return shlex.join(parts)


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
        print(f"(log stream ended: {exc}; waiting for the job to finish)", file=sys.stderr)
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
