"""What a base model's source names, told from its text or its files alone (no torch, no diffusers), so that the Tune
trial process, the driver and the registry can tell a registry URI from a folder or a hub id, and find a pipeline's
folder, without loading the model stack."""

from __future__ import annotations

import json
from pathlib import Path

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
BUILTIN_SHAPES = "builtin:shapes"
CODEC_COMPONENTS = ("vqvae", "vae")  # the pipeline components that hold a latent model's autoencoder


def is_model_uri(text: str) -> bool:
    """An MLflow model or artifact URI (models:/, runs:/, mlflow-artifacts:/, s3://...), not a folder or hub id."""
    return str(text).startswith(MLFLOW_PREFIXES) or "://" in str(text)


def is_latent_pipeline(folder: Path) -> bool:
    """Whether the pipeline folder's model_index.json names an autoencoder (a latent diffusion model, `LDMPipeline`)."""
    index = Path(folder) / "model_index.json"
    return index.is_file() and any(json.loads(index.read_text()).get(name) for name in CODEC_COMPONENTS)


def find_diffusers_dir(root: Path) -> Path | None:
    """The shallowest directory under `root` with model_index.json (a pipeline), else with a UNet config."""
    root = Path(root)
    for marker in ("model_index.json", "config.json"):
        hits = sorted(root.rglob(marker), key=lambda p: len(p.parts))
        if hits:
            return hits[0].parent
    return None


def unusable_source(text: str) -> str | None:
    """Why `text` can name no model (one line with the fix), or None when it may: a registry URI, the built-in model, an
    existing path, or a hub id (`org/name`, looked up in the Hugging Face cache when offline). Checked from the text and
    the file system alone, so a mistyped folder is refused before the model stack is imported."""
    if is_model_uri(text) or text == BUILTIN_SHAPES or Path(text).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # a text check; no network

    try:
        validate_repo_id(text)
        return None
    except HFValidationError:
        return (f"{text}: no such folder, and not a hub id (org/name), {BUILTIN_SHAPES} or an MLflow model URI "
                "(models:/NAME@alias, runs:/ID/model); fix: point it at a diffusers folder or name one of those")
