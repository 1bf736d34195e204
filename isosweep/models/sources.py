"""What a base model's source names, told from its text or its files alone (no torch, no diffusers), so that the Tune
trial process, the driver and the registry can tell a registry URI from a folder or a hub id, and find a pipeline's
folder, without loading the model stack."""

from __future__ import annotations

import json
from pathlib import Path

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
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
