"""The MLflow client of one tracking URI, and the retries every network call goes through.

Every network call goes through `retry_call`: exponential backoff (`ISOSWEEP_TRACKING_RETRIES`
attempts, first wait `ISOSWEEP_TRACKING_BACKOFF_S` seconds), then `TrackingError` naming the URI.
MLflow's own HTTP retries and timeout are capped (`MLFLOW_HTTP_REQUEST_MAX_RETRIES` 0,
`MLFLOW_HTTP_REQUEST_TIMEOUT` 20 s, unless the user set them) so the total wait stays bounded.
A client of a URI with credentials keeps MLflow from printing the run's URL (password included) when a run ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from isosweep.console import warn
from isosweep.redact import scrub, scrub_text

T = TypeVar("T")

# MLflow 3.17's limits (mlflow.utils.validation): values longer than these are rejected.
MAX_PARAM_VAL = 6000
MAX_TAG_VAL = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

class TrackingError(RuntimeError):
    """The tracking server (or its artifact store) could not be reached or refused a request."""


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
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")  # MLflow's 120 s would hold a trial per call


# What a failed MLflow call is: TRANSIENT (no answer, 5xx, 429) is retried; AUTH (401/403: an expired token, no rights)
# and MISSING (404: the run or experiment is gone) are refusals no retry changes; INVALID is a bad request (a bug) and raises.
TRANSIENT, AUTH, MISSING, INVALID = "transient", "auth", "missing", "invalid"
_AUTH_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"}
_MISSING_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND"}
_INVALID_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
# a deleted (not yet garbage-collected) run or experiment: MLflow answers 400 INVALID_PARAMETER_VALUE with this text
_DELETED = re.compile(r"must be in the 'active' state\. Current state is deleted")


def failure_kind(exc: BaseException) -> str:
    """TRANSIENT, AUTH, MISSING or INVALID: the one classification of a failed tracking call (MLflow's error code, or
    the HTTP status of an artifact request that failed outside MLflow's REST client)."""
    if isinstance(exc, MlflowException):
        code = exc.error_code
        if code in _AUTH_CODES:
            return AUTH
        if code in _MISSING_CODES or (code == "INVALID_PARAMETER_VALUE" and _DELETED.search(str(exc.message))):
            return MISSING
        return INVALID if code in _INVALID_CODES else TRANSIENT
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AUTH
    if isinstance(exc, (TypeError, ValueError, KeyError, FileNotFoundError, NotADirectoryError)):
        return INVALID
    return TRANSIENT


def refusal(exc: BaseException) -> str | None:
    """AUTH or MISSING when `exc` (or what it was raised from) is a refusal of the tracking server, else None."""
    seen: BaseException | None = exc
    for _ in range(5):  # a wrapped error: TrackingError from ..., a step of a helper
        if seen is None:
            return None
        kind = failure_kind(seen)
        if kind in (AUTH, MISSING):
            return kind
        seen = seen.__cause__
    return None


class TrackingStop:
    """Tracking stopped for good by a refusal (AUTH or MISSING): every holder skips its MLflow calls from then on,
    and one warning line says why and what to do. scope: whose tracking stops ("trial 3f2a"); sync_target: what
    `isosweep sync` is given to record it later (the sweep's storage URI)."""

    def __init__(self, uri: str, scope: str = "the sweep", sync_target: str | None = None) -> None:
        self.uri, self.scope, self.sync_target = uri, scope, sync_target
        self.kind: str | None = None

    def stop(self, kind: str, what: str, exc: BaseException | None = None, *, quiet: bool = False) -> None:
        """Record the refusal; the first one is said (unless `quiet`: another process said it)."""
        if self.kind is not None:
            return
        self.kind = kind
        if quiet:
            return
        sync = f"`isosweep sync {scrub_text(self.sync_target)}`" if self.sync_target else "`isosweep sync` on the sweep"
        if kind == AUTH:
            why = "refused as unauthenticated or forbidden (HTTP 401/403: the token expired or lacks the rights)"
            fix = f"renew the token (MLFLOW_TRACKING_TOKEN, or the credentials in the tracking URI), then run {sync}"
        else:
            why = "found its run or experiment gone (deleted, or HTTP 404)"
            fix = f"run {sync}: it records the trial again, in a new run"
        warn(f"{self.scope}: MLflow at {scrub_text(self.uri)} {why} while {what} ({_short(exc)}); tracking stops for "
             f"{self.scope}, which goes on and keeps its results in storage; fix: {fix}")


def retry_call(
    what: str,
    uri: str,
    fn: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    backoff_s: float | None = None,
    already_done: Callable[[], T | None] | None = None,
    **kwargs: Any,
) -> T:
    """Call `fn(*args, **kwargs)`, retrying transient failures (`failure_kind`) with exponential backoff and jitter;
    any other failure raises at once, as it came (a refusal: `refusal(exc)` says which).

    Waits about backoff_s, 2*backoff_s, 4*backoff_s, ... (each x0.5-1.5 at random, so many trials
    hitting one recovering server do not retry in step) between `attempts` tries, then raises
    `TrackingError` whose message names `what` and the (scrubbed) tracking `uri`.
    already_done: for a create, a lookup run before every retry; what it finds is returned instead of
    creating again (the first create may have succeeded with its response lost).
    """
    _bound_mlflow_http_retries()
    default_attempts, default_backoff = _retry_settings()
    attempts = default_attempts if attempts is None else max(1, attempts)
    backoff_s = default_backoff if backoff_s is None else backoff_s
    last: BaseException | None = None
    for i in range(attempts):
        if i > 0 and already_done is not None:
            with contextlib.suppress(Exception):  # a failing lookup just means: try the create again
                found = already_done()
                if found is not None:
                    return found
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if failure_kind(exc) != TRANSIENT:
                raise  # a retry gets the same answer
            last = exc
            if i + 1 < attempts:
                wait = backoff_s * (2**i) * random.uniform(0.5, 1.5)
                warn(f"{what} failed at {scrub_text(uri)} ({_short(exc)}); retry {i + 1}/{attempts - 1} in {wait:.1f}s")
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


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def params_of(values: Mapping[str, Any]) -> list[Param]:
    return [Param(clip(k, MAX_KEY), clip(scrub(k, v), MAX_PARAM_VAL)) for k, v in flatten(values).items()]


def tags_of(values: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(clip(k, MAX_KEY), clip(scrub(k, v), MAX_TAG_VAL)) for k, v in values.items()]


def chunks(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]



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


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a server-less sqlite store, keep artifacts next to the database instead of ./mlruns."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _has_userinfo(uri: str) -> bool:
    """True for a URI with `user:password@` (or `token@`) in its authority."""
    try:
        return "@" in urlsplit(uri).netloc
    except ValueError:  # a malformed authority (an unclosed '[')
        return "@" in uri


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to this URI (the registry follows the tracking URI unless MLFLOW_REGISTRY_URI is set).

    For a URI with credentials in it, MLflow's "View run NAME at: URL" line (printed to stdout when a run ends,
    the URL built from the tracking URI, password included) is turned off, unless the user set
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT; a URI without credentials keeps the link."""
    if _has_userinfo(tracking_uri):
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)


def artifact_location(tracking_uri: str, uri: str) -> str:
    """Where the artifacts of `uri` are stored, asking the tracking server at `tracking_uri` (public client API only).

    `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest` and `models:/m-<model id>` (each with an
    optional `/sub/path`) become their storage location (`mlflow-artifacts:/...`, `s3://...`, a local path);
    anything else (`runs:/`, `s3://`, ...) is returned as is, since `download_artifacts` and `list_artifacts`
    resolve those with the `tracking_uri` they are given. MLflow itself resolves a `models:/` URI through the
    process-wide tracking and registry URIs, which a sweep must not change.
    """
    if not uri.startswith("models:/"):
        return uri
    rest = uri[len("models:/"):].strip("/")
    if not rest:
        raise MlflowException.invalid_parameter_value(f"{uri}: no model named; use models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-ID")
    c = client(tracking_uri)
    head, _, tail = rest.partition("/")
    if head.startswith("m-") and "@" not in head:  # a LoggedModel id
        location, sub = c.get_logged_model(head).artifact_location, tail
    elif "@" in head:
        name, alias = head.split("@", 1)
        location, sub = c.get_model_version_download_uri(name, c.get_model_version_by_alias(name, alias).version), tail
    else:
        version, _, sub = tail.partition("/")
        if version == "latest":
            found = c.search_model_versions(f"name='{head}'")
            if not found:
                raise MlflowException(f"{uri}: registered model {head!r} has no versions", error_code=RESOURCE_DOES_NOT_EXIST)
            version = str(max(int(v.version) for v in found))
        elif not version.isdigit():
            raise MlflowException.invalid_parameter_value(f"{uri}: expected a version number, 'latest' or @ALIAS after the name "
                                                          "(registry stages are not supported)")
        location = c.get_model_version_download_uri(head, version)
    return location.rstrip("/") + "/" + sub if sub else location


