"""Models from MLflow: a registered or logged model (or any artifact URI) downloaded to a local diffusers folder.

`download_model` is a `models.loading.Fetch` (uri, dst), the downloader the layers below take for MLflow base
models, so MLflow stays in this layer; `fetcher` binds it to a tracking URI and to pinned versions;
`pin_model_uri` turns `models:/NAME@alias` (or `/latest`) into the version it points at now, so a trial
downloads, and records, one fixed version; `resolve_model` turns a folder or a URI into the pipeline folder to load.
A registry name, alias or version that does not exist raises `ModelNotFoundError`, which is deterministic: a
trial fails at once with it instead of retrying (`isosweep.errors`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from isosweep.models.loading import Fetch
from isosweep.models.sources import find_diffusers_dir, is_model_uri
from isosweep.redact import scrub_text
from isosweep.tracking.client import artifact_location, client, retry_call
from isosweep.tracking.registry import PIPELINE_SUBPATH

# models:/NAME@ALIAS[/sub] and models:/NAME/latest[/sub]: the registry URIs whose version can move
_MOVABLE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/latest)(?P<sub>/.*)?$")
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


class ModelNotFoundError(LookupError):
    """A model URI whose registered model, alias or version the tracking server does not have."""

    deterministic = True  # asked again, the server gives the same answer: not retried (isosweep.errors)


@contextlib.contextmanager
def _named_model(uri: str, tracking_uri: str | None) -> Iterator[None]:
    """MLflow's "not found" for `uri` as a ModelNotFoundError naming the URI, the server and the fix."""
    try:
        yield
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in _NOT_FOUND:
            raise
        where = scrub_text(tracking_uri or mlflow.get_tracking_uri())
        raise ModelNotFoundError(f"{uri}: not found at the tracking server {where} ({scrub_text(exc.message)}); fix: check "
                                 "the name and alias in the MLflow UI (`isosweep validate` looks it up before Ray starts), "
                                 "or pin a registered version, models:/NAME/VERSION") from None


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(`uri` at a fixed version, that version): `models:/NAME@ALIAS` and `models:/NAME/latest` become
    `models:/NAME/VERSION` as the registry answers now; `models:/NAME/VERSION` keeps its version; other URIs
    (`runs:/`, `models:/m-ID`, `s3://`) are returned as they are, with no version."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    fixed = re.match(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)(?:/.*)?$", uri)
    if fixed:
        return uri, fixed.group("version")
    movable = _MOVABLE.match(uri)
    if not movable:
        return uri, None
    c, name, alias = client(tracking_uri), movable.group("name"), movable.group("alias")

    def _version() -> str:
        if alias:
            return str(c.get_model_version_by_alias(name, alias).version)
        found = c.search_model_versions(f"name='{name}'")
        if not found:
            raise MlflowException(f"registered model {name!r} has no versions", error_code="RESOURCE_DOES_NOT_EXIST")
        return str(max(int(v.version) for v in found))

    with _named_model(uri, tracking_uri):
        version = retry_call(f"resolve {uri}", tracking_uri, _version)
    return f"models:/{name}/{version}{movable.group('sub') or ''}", version


def download_model(uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    """Download a `models:/`, `runs:/` or artifact URI to `dst` (default: a new temp dir); returns the folder."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    root = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="isosweep-model-"))
    root.mkdir(parents=True, exist_ok=True)

    def _download() -> str:
        if tracking_uri and uri.startswith("models:/"):
            # resolved here: MLflow resolves models:/ through the process-wide tracking URI, not the one given.
            # The model's files (MLmodel, artifacts/pipeline, ...) land in `root` itself, as for a models:/ download.
            repo = get_artifact_repository(artifact_location(tracking_uri, uri), tracking_uri=tracking_uri)
            return repo.download_artifacts("", dst_path=str(root))
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(root), tracking_uri=tracking_uri)

    with _named_model(uri, tracking_uri):
        return Path(retry_call(f"download {uri}", tracking_uri or mlflow.get_tracking_uri(), _download))


def fetcher(tracking_uri: str | None, pinned: Mapping[str, str] | None = None) -> Fetch:
    """`download_model` as a `Fetch` bound to `tracking_uri`; a URI in `pinned` is downloaded as the URI it maps to
    (`models:/NAME@champion` -> `models:/NAME/3`, from `pin_model_uri`)."""
    pins = dict(pinned or {})

    def fetch(uri: str, dst: Path) -> Path:
        return download_model(pins.get(uri, uri), dst, tracking_uri)

    return fetch


def resolve_model(model_or_uri: str | os.PathLike, tracking_uri: str | None = None, dst: str | os.PathLike | None = None) -> Path:
    """The local diffusers pipeline dir of a model: a local dir (a pipeline, a pulled model, a
    checkpoint) as is, or a `models:/` / `runs:/` URI downloaded to `dst` (default a temp dir)."""
    text = str(model_or_uri)
    if is_model_uri(text):
        base = download_model(text, dst, tracking_uri)
    else:
        base = Path(text).expanduser()
        if not base.exists():
            raise FileNotFoundError(f"{text}: no such directory, and not an MLflow URI (models:/NAME@alias, runs:/ID/model)")
    preferred = base / PIPELINE_SUBPATH
    if (preferred / "model_index.json").is_file():
        return preferred
    found = find_diffusers_dir(base)
    if found is None:
        raise FileNotFoundError(f"{text} (at {base}) holds no diffusers directory (model_index.json or unet/config.json)")
    return found
