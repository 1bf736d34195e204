"""Models from MLflow: a registered or logged model (or any artifact URI) downloaded to a local diffusers folder.

`download_model` is the `fetch` the layers below take for MLflow base models (`models.loading`), so
MLflow stays in this layer; `resolve_model` turns a folder or a URI into the pipeline folder to load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from isosweep.models.loading import find_diffusers_dir, is_model_uri
from isosweep.tracking.client import artifact_location, retry_call
from isosweep.tracking.registry import PIPELINE_SUBPATH


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

    return Path(retry_call(f"download {uri}", tracking_uri or mlflow.get_tracking_uri(), _download))


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
