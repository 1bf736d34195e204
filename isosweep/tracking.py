"""MLflow tracking: one parent run per sweep, one child run per trial, batched step metrics, retries.

Layout (docs/tracking.md): experiment = `spec.experiment_name`; the sweep is a parent run tagged
`isosweep.role=sweep` and `isosweep.sweep_id`; each trial is a child run tagged `mlflow.parentRunId`,
`isosweep.role=trial` and `isosweep.trial_id`. Runs are created and reopened through `MlflowClient`
with explicit run ids, so any process (the driver, a Tune trial, a Train rank-0 worker) can log to
them; `nested=True` is not used because it only works inside one process.

Every network call goes through `retry_call`: exponential backoff (`ISOSWEEP_TRACKING_RETRIES`
attempts, first wait `ISOSWEEP_TRACKING_BACKOFF_S` seconds), then `TrackingError` naming the URI.
MLflow's own HTTP retries are capped (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, unless the user set it) so
the total wait stays bounded. Every param, tag and logged text passes through `scrub` first, so no
AWS key, token or password reaches the tracking server.

Only the sweep driver, trial adapters and the CLI import this module; the math modules never do.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

import isosweep

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow 3.17's limits (mlflow.utils.validation): values longer than these are rejected.
MAX_PARAM_VAL = 6000
MAX_TAG_VAL = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

TAG_ROLE = "isosweep.role"
TAG_SWEEP_ID = "isosweep.sweep_id"
TAG_SWEEP_NAME = "isosweep.sweep_name"
TAG_STORAGE = "isosweep.storage"
TAG_TRIAL_ID = "isosweep.trial_id"
TAG_CHAMPION = "isosweep.champion_run_id"
TAG_PARENT = "mlflow.parentRunId"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
EVAL_ARTIFACT_PATH = "eval"
# Files of a checkpoint directory that are training state, not the model.
CHECKPOINT_EXCLUDE = ("train_state.pt", "eval", "__pycache__", "*.lock")

REDACTED = "***"


class TrackingError(RuntimeError):
    """The tracking server (or its artifact store) could not be reached or refused a request."""


# --------------------------------------------------------------------------------------- retries


def _retry_settings() -> tuple[int, float]:
    attempts = int(os.environ.get("ISOSWEEP_TRACKING_RETRIES", "4"))
    backoff = float(os.environ.get("ISOSWEEP_TRACKING_BACKOFF_S", "1.0"))
    return max(1, attempts), max(0.0, backoff)


def _bound_mlflow_http_retries() -> None:
    """Cap MLflow's own HTTP retries (default 7 with factor 2: minutes) unless the user set them.

    Our retry layer does the backing off; without this a dead server would block for ~4 minutes
    per call before our first retry even starts.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: bad requests, missing resources, validation."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        return code in {
            "INVALID_PARAMETER_VALUE",
            "RESOURCE_DOES_NOT_EXIST",
            "RESOURCE_ALREADY_EXISTS",
            "INVALID_STATE",
            "BAD_REQUEST",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
        }
    return isinstance(exc, (TypeError, ValueError, KeyError, FileNotFoundError, NotADirectoryError))


def retry_call(
    what: str,
    uri: str,
    fn: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    backoff_s: float | None = None,
    **kwargs: Any,
) -> T:
    """Call `fn(*args, **kwargs)`, retrying transient failures with exponential backoff.

    Waits backoff_s, 2*backoff_s, 4*backoff_s, ... between `attempts` tries, then raises
    `TrackingError` whose message names `what` and the (scrubbed) tracking `uri`.
    """
    _bound_mlflow_http_retries()
    default_attempts, default_backoff = _retry_settings()
    attempts = default_attempts if attempts is None else max(1, attempts)
    backoff_s = default_backoff if backoff_s is None else backoff_s
    last: BaseException | None = None
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc):
                raise
            last = exc
            if i + 1 < attempts:
                wait = backoff_s * (2**i)
                log.warning("%s failed at %s (%s); retry %d/%d in %.1fs", what, scrub_text(uri), _short(exc), i + 1, attempts - 1, wait)
                time.sleep(wait)
    raise TrackingError(
        f"{what}: MLflow tracking at {scrub_text(uri)} is unreachable or failing after {attempts} attempt(s): {_short(last)}. "
        "Check that the server is up and MLFLOW_TRACKING_URI/--tracking-uri is right; the trial's checkpoints stay in "
        "Ray storage and `isosweep sync SPEC` uploads them later."
    ) from last


def retrying(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form of `retry_call` for functions whose first argument is the tracking URI."""

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(tracking_uri: str, *args: Any, **kwargs: Any) -> T:
            return retry_call(what, tracking_uri, fn, tracking_uri, *args, **kwargs)

        return wrapper

    return deco


def _short(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc else "unknown error"
    text = scrub_text(text)
    return text if len(text) < 400 else text[:400] + "..."


# --------------------------------------------------------------------------------------- secrets

_SECRET_KEY_PATTERNS = ("*secret*", "*token*", "*password*", "*passwd*", "*credential*", "*api_key*", "*apikey*",
                        "*access_key*", "*private_key*", "*session_key*", "aws_*", "*authorization*", "*auth_token*")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s:]*(?::[^/@\s]*)?)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<k>[?&;](?:[^=&\s]*(?:secret|token|password|passwd|signature|credential|access_key|api_key|apikey|sig))=)(?P<v>[^&\s#]+)"
)
# `hub_token: abc`, `"aws_secret_access_key": "abc"`, `password=abc` inside YAML, JSON or free text
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<k>[\"']?\b[\w.\-]*(?:secret|token|password|passwd|credential|access_key|api_key|apikey|private_key)[\w.\-]*[\"']?\s*[:=]\s*)"
    r"(?P<v>\"[^\"\n]*\"|'[^'\n]*'|[^\s,}&#]+)"
)
_TOKEN_LIKE = re.compile(
    r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bhf_[A-Za-z0-9]{20,}\b"  # Hugging Face
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}\b|\bgithub_pat_[A-Za-z0-9_]{20,}\b"  # GitHub
    r"|\bsk-[A-Za-z0-9_\-]{20,}\b"  # OpenAI-style
    r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}\b"  # Slack
    r"|\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"  # JWT
)


def is_secret_key(key: str) -> bool:
    """True for names such as AWS_SECRET_ACCESS_KEY, hub_token, db.password."""
    k = key.lower()
    return any(fnmatch.fnmatch(k, p) for p in _SECRET_KEY_PATTERNS)


def _secret_env_values() -> list[str]:
    """Values of secret-looking environment variables present now (longest first)."""
    env: dict[str, str] = {}
    for _ in range(5):  # another thread (MLflow's telemetry) may change os.environ while we copy it
        try:
            env = dict(os.environ)
            break
        except (KeyError, RuntimeError):
            continue
    vals = {v for k, v in env.items() if is_secret_key(k) and v and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def _redact_assignment(m: re.Match) -> str:
    v = m.group("v")
    q = v[0] if v[0] in "\"'" else ""  # keep quotes so JSON and YAML stay parseable
    return f"{m.group('k')}{q}{REDACTED}{q}"


def scrub_text(text: str) -> str:
    """Remove credentials from free text: URI userinfo, secret query params, token-like strings,
    and the values of secret environment variables (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN...)."""
    if not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group('k')}{REDACTED}", text)
    text = _SECRET_ASSIGNMENT.sub(_redact_assignment, text)
    return _TOKEN_LIKE.sub(REDACTED, text)


def scrub(key: str, value: Any) -> str:
    """The string to log for `key`: fully redacted when the key names a secret, else scrubbed text."""
    text = "" if value is None else str(value)
    last = key.rsplit(".", 1)[-1]
    if text and (is_secret_key(key) or is_secret_key(last)):
        return REDACTED
    return scrub_text(text)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'p': 0.5}} -> {'train.p': 0.5}; lists are kept as one JSON value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(_clip(k, MAX_KEY), _clip(scrub(k, v), MAX_PARAM_VAL)) for k, v in flatten(values).items()]


def _tags(values: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(_clip(k, MAX_KEY), _clip(scrub(k, v), MAX_TAG_VAL)) for k, v in values.items()]


def _chunks(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --------------------------------------------------------------------------------------- URIs


def resolve_tracking_uri(spec_uri: str | None, cli_uri: str | None, storage_path: str | os.PathLike | None) -> str:
    """--tracking-uri, then the spec's `tracking.uri`, then MLFLOW_TRACKING_URI, then a local SQLite file.

    The local default is `sqlite:///<abs storage path>/mlflow.db` (no server; MLflow 3.17 refuses
    the old ./mlruns file store). For s3:// storage the local default lives in ./isosweep-mlflow.
    """
    for uri in (cli_uri, spec_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if uri:
            return uri
    storage = str(storage_path or "runs")
    if "://" in storage:
        storage = "isosweep-mlflow"
    root = Path(storage).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _local_artifact_location(tracking_uri: str) -> str | None:
    """For a server-less sqlite store, keep artifacts next to the database instead of ./mlruns."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to this URI (the registry follows the tracking URI unless MLFLOW_REGISTRY_URI is set)."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)


@contextlib.contextmanager
def use_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Temporarily point MLflow's fluent API (log_model, download_artifacts) at `tracking_uri`."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):
        yield


# --------------------------------------------------------------------------------------- experiments and runs


@retrying("get or create experiment")
def get_or_create_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Experiment id of `name`, creating it (artifact_location: e.g. s3://bucket/prefix for client-side S3)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location or _local_artifact_location(tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id  # another process won the race


def _experiment_id(tracking_uri: str, experiment_id_or_name: str) -> str:
    c = client(tracking_uri)
    if str(experiment_id_or_name).isdigit():
        exp = retry_call("get experiment", tracking_uri, c.get_experiment, str(experiment_id_or_name))
        if exp is not None:
            return exp.experiment_id
    return get_or_create_experiment(tracking_uri, str(experiment_id_or_name))


def make_sweep_id(spec_name: str, storage_path: str) -> str:
    """Stable id of one sweep: its name and where its storage lives (same id on resume)."""
    loc = storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
    return hashlib.sha1(f"{spec_name}\n{loc}".encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def find_or_create_sweep_run(
    spec: Any,
    spec_path: str | os.PathLike | None,
    tracking_uri: str,
    sweep_id: str | None = None,
    *,
    storage_path: str | None = None,
    artifact_location: str | None = None,
    fresh: bool = False,
) -> str:
    """The sweep's parent run id: reuses the run tagged `isosweep.sweep_id=<sweep_id>` (resume), else creates it.

    spec: a `SweepSpec`; sweep_id: the sweep's stable id (default: a hash of spec.name and the
    storage path, see `make_sweep_id`); storage_path: the effective storage (default
    spec.storage.path; recorded as a tag). Logs the resolved config as params (flattened, scrubbed,
    truncated to MLflow's limits), the spec file and resolved config as `spec/` artifacts (scrubbed
    text), the git commit and isosweep version as tags. `fresh=True` always creates a new parent run.
    """
    storage = str(storage_path or spec.storage.path)
    sid = sweep_id or make_sweep_id(spec.name, storage)
    exp_id = get_or_create_experiment(tracking_uri, spec.experiment_name, artifact_location)
    c = client(tracking_uri)
    if not fresh:
        runs = retry_call(
            "search sweep runs", tracking_uri, c.search_runs, [exp_id],
            filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sid}' and tags.`{TAG_ROLE}` = 'sweep'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                retry_call("reopen sweep run", tracking_uri, c.update_run, run_id, status="RUNNING")
            return run_id
    tags = {
        TAG_ROLE: "sweep",
        TAG_SWEEP_ID: sid,
        TAG_SWEEP_NAME: spec.name,
        TAG_STORAGE: storage,
        "isosweep.version": isosweep.__version__,
        "mlflow.runName": spec.name,
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["isosweep.git_commit"] = commit
    run = retry_call("create sweep run", tracking_uri, c.create_run, exp_id, tags={t.key: t.value for t in _tags(tags)}, run_name=spec.name)
    run_id = run.info.run_id
    params = _params(spec.to_dict())
    for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        retry_call("log sweep params", tracking_uri, c.log_batch, run_id, params=list(chunk))
    with tempfile.TemporaryDirectory() as tmp:
        if spec_path and Path(spec_path).is_file():
            (Path(tmp) / Path(spec_path).name).write_text(scrub_text(Path(spec_path).read_text()))
        import yaml

        (Path(tmp) / "resolved_spec.yaml").write_text(scrub_text(yaml.safe_dump(_scrub_tree(spec.to_dict()), sort_keys=False)))
        retry_call("log spec", tracking_uri, c.log_artifacts, run_id, tmp, "spec")
    return run_id


start_sweep_run = find_or_create_sweep_run


def _scrub_tree(d: Any, key: str = "") -> Any:
    if isinstance(d, Mapping):
        return {k: _scrub_tree(v, str(k)) for k, v in d.items()}
    if isinstance(d, list):
        return [_scrub_tree(v, key) for v in d]
    if isinstance(d, str):
        return scrub(key, d)
    return d


def find_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    """The existing child run of `trial_id` under `parent_run_id` (an mlflow Run), or None."""
    c = client(tracking_uri)
    runs = retry_call(
        "search trial runs", tracking_uri, c.search_runs, [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        order_by=["attributes.start_time ASC"], max_results=5,
    )
    return runs[0] if runs else None


def open_trial_run(
    tracking_uri: str,
    experiment_id_or_name: str,
    parent_run_id: str,
    trial_id: str,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Create the trial's child run, or reopen (status RUNNING) the one this trial already has.

    Safe to call from any process (Tune trial, Train rank 0) and on every retry: the run is found by
    its tags `mlflow.parentRunId` + `isosweep.trial_id`, so a retried trial never duplicates its run.
    Params already logged are not logged again (MLflow params are immutable).
    """
    exp_id = _experiment_id(tracking_uri, experiment_id_or_name)
    c = client(tracking_uri)
    existing = find_trial_run(tracking_uri, exp_id, parent_run_id, trial_id)
    if existing is not None:
        run_id = existing.info.run_id
        if existing.info.status != "RUNNING":
            retry_call("reopen trial run", tracking_uri, c.update_run, run_id, status="RUNNING")
        have = existing.data.params
    else:
        tags = {TAG_PARENT: parent_run_id, TAG_TRIAL_ID: trial_id, TAG_ROLE: "trial", "mlflow.runName": trial_id}
        run = retry_call("create trial run", tracking_uri, c.create_run, exp_id, tags={t.key: t.value for t in _tags(tags)}, run_name=trial_id)
        run_id, have = run.info.run_id, {}
    new = [p for p in _params(params or {}) if p.key not in have]
    for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
        retry_call("log trial params", tracking_uri, c.log_batch, run_id, params=list(chunk))
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", *, quiet: bool = False) -> None:
    """Terminate a run: FINISHED, FAILED or KILLED (a crashed trial's run must end FAILED).

    quiet=True logs a warning instead of raising when the server stays unreachable (use it in an
    `except` block so the tracking error does not replace the trial's own error).
    """
    status = status.upper()
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run status must be FINISHED, FAILED or KILLED (got {status!r})")
    try:
        retry_call("end run", tracking_uri, client(tracking_uri).set_terminated, run_id, status=status)
    except TrackingError as exc:
        if not quiet:
            raise
        log.warning("could not mark run %s %s: %s", run_id, status, exc)


@contextlib.contextmanager
def run_guard(tracking_uri: str, run_id: str) -> Iterator[str]:
    """`with run_guard(uri, run_id):` ends the run FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    try:
        yield run_id
    except KeyboardInterrupt:
        end_run(tracking_uri, run_id, "KILLED", quiet=True)
        raise
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED", quiet=True)
        raise
    end_run(tracking_uri, run_id, "FINISHED")


# --------------------------------------------------------------------------------------- step metrics


class StepLogger:
    """Buffers step metrics and sends them with `MlflowClient.log_batch` every `flush_every` steps.

    For the training loop (rank 0): `log({"loss": 0.1, "tr_ratio": 1.2}, step)` costs no network
    call; every `flush_every` distinct steps one batched request goes out (1000 metrics per request).
    A failed periodic flush never stops training: it is tried once, the metrics stay buffered (up to
    `max_buffer`, oldest dropped after that) and one warning is printed. `close()` (the final flush)
    retries with backoff and raises `TrackingError` naming the URI if the server is still down.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50, max_buffer: int = 200_000) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every = max(1, int(flush_every))
        self.max_buffer = max_buffer
        self._buffer: list[Metric] = []
        self._steps_since_flush = 0
        self._last_step: int | None = None
        self._warned = False
        self._closed = False
        self._client = client(tracking_uri)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer finite scalar metrics (floats, ints, 0-d tensors) at `step`."""
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                v = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._buffer.append(Metric(key=_clip(str(key), MAX_KEY), value=v, timestamp=ts, step=int(step)))
        if step != self._last_step:
            self._steps_since_flush += 1
            self._last_step = step
        if len(self._buffer) > self.max_buffer:
            del self._buffer[: len(self._buffer) - self.max_buffer]
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self, *, final: bool = False) -> bool:
        """Send the buffer; True when it is empty afterwards. Non-final flushes never raise."""
        self._steps_since_flush = 0
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            try:
                if final:
                    retry_call("log step metrics", self.tracking_uri, self._client.log_batch, self.run_id, metrics=chunk)
                else:
                    retry_call("log step metrics", self.tracking_uri, self._client.log_batch, self.run_id, metrics=chunk, attempts=1)
            except TrackingError as exc:
                if final:
                    raise TrackingError(f"final flush of {len(self._buffer)} buffered step metrics failed: {exc}") from exc
                if not self._warned:
                    warnings.warn(f"isosweep: step metrics kept in memory, tracking server not reachable: {exc}", RuntimeWarning, stacklevel=2)
                    self._warned = True
                return False
            del self._buffer[: len(chunk)]
        return True

    def close(self, *, raise_errors: bool = True) -> None:
        """Final flush (retried with backoff); raises TrackingError naming the URI if it cannot.

        raise_errors=False warns instead (use it while another exception is propagating, so the
        tracking error does not hide the training error).
        """
        if self._closed:
            return
        try:
            self.flush(final=True)
        except TrackingError as exc:
            if raise_errors:
                raise
            warnings.warn(f"isosweep: {exc}", RuntimeWarning, stacklevel=2)
        self._closed = True

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(raise_errors=exc_type is None)


# --------------------------------------------------------------------------------------- trial results


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a diffusers checkpoint without training state (hard links where possible)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*CHECKPOINT_EXCLUDE), copy_function=link_or_copy)
    return dst


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def _plot_rtl(curve: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot(range(len(curve)), list(curve), marker="o", ms=3)
    ax.set_xlabel("DDIM step index (t from T to 0)")
    ax.set_ylabel("RTL(t)")
    ax.set_title("relative trajectory length")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_eval_metrics(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, float], dict[str, str], list[float] | None]:
    """(metrics, backbones, rtl_curve) from `<checkpoint_dir>/eval/metrics.json`; empty if absent.

    Accepts {"metrics": {...}, "backbones": {...}, "rtl_curve": [...]} or a flat dict whose numeric
    values are the metrics (and `backbone_<metric>` / `backbones` entries name the backbones).
    """
    data = _read_json(Path(checkpoint_dir) / "eval" / "metrics.json")
    inner = data.get("metrics") if isinstance(data.get("metrics"), dict) else data
    metrics = _numeric(inner)
    backbones = dict(data.get("backbones") or {}) if isinstance(data.get("backbones"), dict) else {}
    for k, v in inner.items():
        if k.startswith("backbone_") and isinstance(v, str):
            backbones.setdefault(k[len("backbone_") :], v)
    curve = data.get("rtl_curve")
    rtl = [float(v) for v in curve] if isinstance(curve, list) and all(isinstance(v, (int, float)) for v in curve) else None
    return metrics, {str(k): str(v) for k, v in backbones.items()}, rtl


def log_trial_result(
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    backbones: Mapping[str, str] | None = None,
    eval_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    rtl_curve: Sequence[float] | None = None,
    *,
    log_eval: bool = True,
    log_checkpoint: bool = True,
    step: int | None = None,
) -> None:
    """Log a trial's final metrics and artifacts to its child run.

    `log_trial_result(uri, run_id, ckpt_dir)` (a path in place of metrics) means checkpoint_dir=ckpt_dir.
    checkpoint_dir: the final diffusers checkpoint (DDPMPipeline dir) -> artifacts `checkpoint/`,
    without `train_state.pt` and its own `eval/`. Its `eval/` folder (metrics.json, grid and strip
    PNGs) supplies the defaults of metrics, backbones, eval_dir and rtl_curve (`read_eval_metrics`);
    explicit arguments win. metrics: {"fid": 12.3, "ppl": ...} (non-numeric values ignored);
    backbones: {"fid": "domain-shapes-v1"} -> param and tag `backbone.fid`; eval_dir -> `eval/`;
    rtl_curve: RTL(t) values -> step metric `rtl_t` and `eval/rtl_curve.png` if none is there.
    log_eval / log_checkpoint=False skip those artifacts (used by `sync` for what is already there).
    """
    if isinstance(metrics, (str, os.PathLike)):
        metrics, checkpoint_dir = None, checkpoint_dir or metrics
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint_dir {ckpt} is not a directory")
        m0, b0, r0 = read_eval_metrics(ckpt)
        metrics = m0 if metrics is None else metrics
        backbones = b0 if backbones is None else backbones
        rtl_curve = r0 if rtl_curve is None else rtl_curve
        if eval_dir is None and (ckpt / "eval").is_dir():
            eval_dir = ckpt / "eval"
    metrics = metrics or {}
    c = client(tracking_uri)
    run = retry_call("get run", tracking_uri, c.get_run, run_id)
    ts = int(time.time() * 1000)
    ms = [Metric(k, v, ts, step or 0) for k, v in _numeric(metrics).items()]
    if rtl_curve is not None and log_eval:
        ms += [Metric("rtl_t", float(v), ts, i) for i, v in enumerate(rtl_curve) if math.isfinite(float(v))]
    for chunk in _chunks(ms, MAX_METRICS_PER_BATCH):
        retry_call("log final metrics", tracking_uri, c.log_batch, run_id, metrics=list(chunk))
    if backbones:
        names = {f"backbone.{k}": v for k, v in backbones.items()}
        params = [p for p in _params(names) if p.key not in run.data.params]
        tags = _tags(names)
        retry_call("log backbones", tracking_uri, c.log_batch, run_id, params=params, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        ev = Path(tmp) / EVAL_ARTIFACT_PATH
        if not log_eval:
            eval_dir, rtl_curve = None, None
        if eval_dir and Path(eval_dir).is_dir():
            shutil.copytree(eval_dir, ev)
        if rtl_curve is not None:
            ev.mkdir(exist_ok=True)
            if not (ev / "rtl_curve.png").exists():
                _plot_rtl(list(rtl_curve), ev / "rtl_curve.png")
            (ev / "rtl_curve.json").write_text(json.dumps([float(v) for v in rtl_curve]))
        for f in ev.rglob("*") if ev.exists() else []:
            if f.is_file() and f.suffix in (".json", ".md", ".txt", ".yaml", ".yml", ".csv"):
                f.write_text(scrub_text(f.read_text(errors="replace")))
        if ev.exists():
            retry_call("log eval artifacts", tracking_uri, c.log_artifacts, run_id, str(ev), EVAL_ARTIFACT_PATH)
    if checkpoint_dir is not None and log_checkpoint:
        ckpt = Path(checkpoint_dir)
        with tempfile.TemporaryDirectory() as tmp:
            staged = _copy_checkpoint(ckpt, Path(tmp) / CHECKPOINT_ARTIFACT_PATH)
            for f in staged.rglob("*.json"):
                text = f.read_text(errors="replace")
                clean = scrub_text(text)
                if clean != text:
                    f.unlink()  # a hard link: never rewrite the original
                    f.write_text(clean)
            retry_call("log checkpoint", tracking_uri, c.log_artifacts, run_id, str(staged), CHECKPOINT_ARTIFACT_PATH)


def log_sweep_summary(
    tracking_uri: str,
    parent_run_id: str,
    *,
    csv_path: str | os.PathLike | None = None,
    md_path: str | os.PathLike | None = None,
    pareto_png: str | os.PathLike | None = None,
    champion_run_id: str | None = None,
    report_dir: str | os.PathLike | None = None,
) -> None:
    """Parent run: results table (CSV, Markdown) and Pareto plot -> `results/`, report folder ->
    `report/`, tag `isosweep.champion_run_id` (a tag, so a resumed sweep can change it)."""
    c = client(tracking_uri)
    for path in (csv_path, md_path, pareto_png):
        if path and Path(path).is_file():
            retry_call("log results", tracking_uri, c.log_artifact, parent_run_id, str(path), "results")
    if report_dir and Path(report_dir).is_dir():
        retry_call("log report", tracking_uri, c.log_artifacts, parent_run_id, str(report_dir), "report")
    if champion_run_id:
        retry_call("tag champion", tracking_uri, c.set_tag, parent_run_id, TAG_CHAMPION, champion_run_id)


# --------------------------------------------------------------------------------------- sync


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


SWEEP_STATE_FILE = "isosweep_sweep.json"  # written by the sweep driver next to its Tune experiment


def _trial_info(ckpt: Path, sweep_dir: Path | None = None) -> tuple[str | None, dict]:
    """(trial id, params) of a checkpoint dir.

    The id comes from `trial_params.json` {"trial_id", "params"}, else `spec.json` ("trial_id"),
    else the layout `<sweep>/train/<trial id>/checkpoint_*` (a trial's Train run is named after it).
    Params come from trial_params.json, else spec.json's "trial_params".
    """
    tp = _read_json(ckpt / "trial_params.json")
    sp = _read_json(ckpt / "spec.json")
    params = tp.get("params") or sp.get("trial_params") or sp.get("params") or {}
    tid = tp.get("trial_id") or sp.get("trial_id")
    if not tid and sweep_dir is not None:
        rel = ckpt.relative_to(sweep_dir).parts
        if "train" in rel[:-1] and rel.index("train") + 1 < len(rel) - 1:
            tid = rel[rel.index("train") + 1]
    return (str(tid) if tid else None), dict(params) if isinstance(params, dict) else {}


def find_trial_results(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Per trial id, its final checkpoint dir under `sweep_dir`: a dir holding `eval/metrics.json`
    whose trial id `_trial_info` can tell; of several, the one evaluated last."""
    sweep_dir = Path(sweep_dir)
    found: dict[str, Path] = {}
    for metrics_file in sweep_dir.rglob("eval/metrics.json"):
        ckpt = metrics_file.parent.parent
        tid, _ = _trial_info(ckpt, sweep_dir)
        if not tid:
            log.warning("sync: %s has results but no trial id (trial_params.json, spec.json or train/<id>/); skipped", ckpt)
            continue
        if tid not in found or metrics_file.stat().st_mtime > (found[tid] / "eval" / "metrics.json").stat().st_mtime:
            found[tid] = ckpt
    return found


def sweep_dirs(storage_path: str, name: str) -> list[Path]:
    """Local folders of the sweeps of spec `name` under storage: `<storage>/<name>` and `<storage>/<name>-*`."""
    root = Path(storage_path).expanduser()
    cands = [root / name, *sorted(root.glob(f"{name}-*"))]
    return [p for p in cands if p.is_dir()]


def _sweep_parent(spec: Any, spec_path: str | None, tracking_uri: str, sweep_dir: Path, storage_path: str) -> str:
    """The parent run recorded in the sweep's state file if the server has it, else found/created by sweep id."""
    state = _read_json(sweep_dir / SWEEP_STATE_FILE)
    rid = state.get("parent_run_id")
    if rid:
        from mlflow.exceptions import MlflowException

        try:
            retry_call("get run", tracking_uri, client(tracking_uri).get_run, rid)
            return rid
        except MlflowException:
            pass  # recorded on another tracking server: create it here
    sid = state.get("experiment_path") or state.get("sweep_id") or sweep_dir.name  # what the driver tagged
    return find_or_create_sweep_run(spec, spec_path, tracking_uri, sid, storage_path=storage_path)


def sync_sweep_dir(
    spec: Any, spec_path: str | None, tracking_uri: str, sweep_dir: str | os.PathLike, storage_path: str | None = None
) -> list[tuple[str, str, list[str]]]:
    """Upload what one sweep folder holds but its MLflow runs lack; returns [(trial_id, run_id, uploaded)].

    For each trial checkpoint found (`find_trial_results`): create the child run if missing; log
    metrics from `eval/metrics.json` that the run lacks; log `checkpoint/` and `eval/` artifacts if
    the run has none; end the run FINISHED if anything was uploaded. Complete runs are left alone.
    """
    sweep_dir = Path(sweep_dir)
    parent = _sweep_parent(spec, spec_path, tracking_uri, sweep_dir, storage_path or str(sweep_dir.parent))
    c = client(tracking_uri)
    exp_id = retry_call("get run", tracking_uri, c.get_run, parent).info.experiment_id
    done = []
    for tid, ckpt in sorted(find_trial_results(sweep_dir).items()):
        file_metrics, _, _ = read_eval_metrics(ckpt)
        _, params = _trial_info(ckpt, sweep_dir)
        run = find_trial_run(tracking_uri, exp_id, parent, tid)
        uploaded: list[str] = []
        if run is None:
            run_id = open_trial_run(tracking_uri, exp_id, parent, tid, params)
            have_metrics: set[str] = set()
            uploaded.append("run")
        else:
            run_id, have_metrics = run.info.run_id, set(run.data.metrics)
        metrics = {k: v for k, v in file_metrics.items() if k not in have_metrics}
        need_ckpt = not retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, CHECKPOINT_ARTIFACT_PATH)
        need_eval = not retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, EVAL_ARTIFACT_PATH)
        if metrics or need_ckpt or need_eval or uploaded:
            log_trial_result(tracking_uri, run_id, metrics, checkpoint_dir=ckpt, log_eval=need_eval, log_checkpoint=need_ckpt)
            uploaded += (["metrics:" + ",".join(sorted(metrics))] if metrics else []) + (["checkpoint"] if need_ckpt else []) + (["eval"] if need_eval else [])
            end_run(tracking_uri, run_id, "FINISHED")
        done.append((tid, run_id, uploaded))
    return done


def sync_command(args: argparse.Namespace) -> int:
    """`isosweep sync SPEC [--storage S] [--tracking-uri U]`: upload what storage has and MLflow lacks.

    Walks `<storage>/<name>` and `<storage>/<name>-*` (local storage; for s3:// storage, copy the
    sweep folder down first). The tracking URI: --tracking-uri, the spec, MLFLOW_TRACKING_URI, the
    one recorded in the sweep's state file, then the local default.
    """
    from isosweep.config import load_spec

    spec = load_spec(args.spec, getattr(args, "overrides", None), check_paths=False)
    storage = args.storage or spec.storage.path
    if "://" in storage:
        raise NotImplementedError(
            f"sync reads local storage only (got {scrub_text(storage)}); copy the sweep folder down first, e.g. "
            f"`aws s3 sync {scrub_text(storage.split('?')[0])}/<sweep id> ./runs/<sweep id>`, then pass --storage ./runs"
        )
    dirs = sweep_dirs(storage, spec.name)
    if not dirs:
        raise FileNotFoundError(f"no sweep folder {spec.name} or {spec.name}-* under {storage}; check --storage and the spec's name")
    total = synced = 0
    for d in dirs:
        recorded = _read_json(d / SWEEP_STATE_FILE).get("tracking_uri")
        explicit = args.tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded
        uri = explicit or resolve_tracking_uri(None, None, storage)
        done = sync_sweep_dir(spec, args.spec, uri, d, storage)
        for tid, run_id, uploaded in done:
            print(f"{d.name}/{tid}\trun {run_id}\t" + (", ".join(uploaded) if uploaded else "up to date"))
        total += len(done)
        synced += sum(1 for *_, u in done if u)
        print(f"{d.name}: {len(done)} trial(s) checked against {scrub_text(uri)}")
    print(f"synced {synced} of {total} trial(s)")
    return 0
