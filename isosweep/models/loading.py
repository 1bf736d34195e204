"""Base models: load a pretrained `UNet2DModel` + `DDPMScheduler` from wherever the spec says.

Sources (`base_model.source`):
- `builtin:shapes`: the small UNet `models/builtin.py` pretrains on `shapes` and caches.
- a local diffusers directory: a pipeline directory (with `unet/`, or `base_model.subfolder`) or a
  bare UNet directory (config.json + weights).
- a hub id such as `google/ddpm-ema-celebahq-256` (read from the local HF cache when offline).
- an MLflow model URI (`models:/NAME@alias`, `runs:/RUN/model`): downloaded by the `fetch` callable the
  caller passes (a `Fetch`: the tracking layer's `download_model` bound to a tracking URI) into a temporary
  folder, loaded, and the folder removed as soon as the weights are in memory, on success or error; the
  artifact holds a diffusers pipeline directory. Every load (each worker of each attempt) downloads again
  rather than keeping a cache keyed by the URI: `@alias` may move between attempts, and only the tracking
  layer can resolve it to a version.

Latent diffusion (docs/training.md, "Latent diffusion"): a pipeline whose model_index.json names an autoencoder
(`LDMPipeline`'s `vqvae`, a `VQModel` or `AutoencoderKL`) loads as a `BaseModel` with a frozen `core.codec.Codec`
beside the latent UNet (`load_base`). `load_unet_and_scheduler` and `load_local` serve the pixel-space paths and
refuse a latent model with `LatentModelError`, rather than treat its latents as images.

`weights_sha256` names the weights a model holds, so a trial can record exactly which base it started from.

The scheduler comes from the model's own scheduler config when there is one, converted to
`DDPMScheduler`; otherwise DDPM with linear betas and T = 1000 (docs/math.md section 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel

from isosweep.core.codec import CODEC_CLASSES, Codec
from isosweep.models.builtin import default_scheduler, pretrain_builtin
from isosweep.models.sources import BUILTIN_SHAPES, CODEC_COMPONENTS, find_diffusers_dir, is_model_uri
from isosweep.spec import SpecError

# MLflow model and artifact URIs; any other `scheme://` URI (s3://, gs://...) is an artifact location too

# fetch(uri, dst): download the MLflow URI `uri` into the existing local folder `dst`, return the folder holding its
# files. The one signature of every downloader given to `load_unet_and_scheduler` (eval, pull, the Train workers).
Fetch = Callable[[str, Path], Path]


class LatentModelError(SpecError):
    """A latent diffusion model given to a path that handles pixel-space models only (bad input: exit code 2)."""


@dataclass
class BaseModel:
    """A base model: the UNet (float32, eval mode, on CPU), its DDPM scheduler, and for a latent model the frozen
    codec between images and the UNet's latents (None: the UNet works on pixels)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    codec: Codec | None = None


def load_unet_and_scheduler(base_model_spec, dataset_spec=None, *, progress: bool = True,
                            fetch: Fetch | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """`load_base`'s UNet and scheduler of a pixel-space model; LatentModelError for a latent one."""
    return pixel_only(load_base(base_model_spec, dataset_spec, progress=progress, fetch=fetch), base_model_spec.source)


def pixel_only(base: BaseModel, source) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler of a pixel-space model; LatentModelError (exit 2) for a latent one."""
    if base.codec is not None:
        raise LatentModelError(f"{source} is a latent diffusion model ({type(base.codec.module).__name__} autoencoder); "
                               "this command handles pixel-space models only; fix: give a pixel-space model (DDPMPipeline), or use "
                               "`run`, `train`, `eval`, `sample` or `interpolate`, which take it (docs/training.md, "
                               "\"Latent diffusion\")")
    return base.unet, base.scheduler


def load_base(base_model_spec, dataset_spec=None, *, progress: bool = True, fetch: Fetch | None = None) -> BaseModel:
    """The base UNet (float32, eval mode, on CPU) and its DDPM scheduler, from any supported source.

    `dataset_spec` is only used by `builtin:shapes` (the resolution it is pretrained at). `fetch(uri, dst)`
    downloads an MLflow model URI into the local folder `dst` and returns where the files are; it comes
    from the tracking layer (`tracking.models.download_model`), which owns MLflow, so this layer never
    imports it. `dst` is a temporary folder this function removes once the weights are loaded.
    """
    src = base_model_spec.source
    if src == BUILTIN_SHAPES:
        return load_local_base(pretrain_builtin(base_model_spec, dataset_spec, progress=progress), None)
    if is_model_uri(src):
        if fetch is None:
            raise ValueError(f"base_model.source {src!r} is an MLflow model URI, and no downloader was given; "
                             "load it through isosweep.tracking.models.download_model")
        return _load_fetched(src, base_model_spec.subfolder, fetch)
    local = Path(os.path.expanduser(src))
    if local.exists():
        return load_local_base(local, base_model_spec.subfolder)
    return _load_hub(src, base_model_spec.subfolder)


def _load_fetched(uri: str, subfolder: str | None, fetch: Fetch) -> BaseModel:
    """Download `uri` into a private temporary folder, load it, remove the folder on every exit path.

    Loading reads the weights into memory (safetensors' memory maps stay valid after the files are
    unlinked on POSIX), so nothing refers to the folder once `load_local` returns.
    """
    with tempfile.TemporaryDirectory(prefix="isosweep-base-", ignore_cleanup_errors=True) as tmp:
        found = find_diffusers_dir(fetch(uri, Path(tmp)))
        if found is None:
            raise FileNotFoundError(f"{uri} holds no diffusers directory (model_index.json or unet/config.json)")
        return load_local_base(found, subfolder)


def load_local(path: Path | str, subfolder: str | None) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler of a local pixel-space model folder; LatentModelError for a latent one."""
    return pixel_only(load_local_base(path, subfolder), path)


def load_local_base(path: Path | str, subfolder: str | None) -> BaseModel:
    """A local pipeline directory (with unet/, or `subfolder`) or bare UNet directory; a latent pipeline's codec too."""
    path = Path(path)
    if subfolder:
        unet_dir = path / subfolder
    elif (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    else:
        unet_dir = path
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no UNet config.json in {unet_dir}; base_model.source must be a diffusers pipeline directory "
            "(with unet/) or a UNet directory, or set base_model.subfolder"
        )
    unet = UNet2DModel.from_pretrained(unet_dir).float().eval()
    sched_cfg = None
    for cand in (path / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.is_file():
            sched_cfg = json.loads(cand.read_text())
            break
    index = path / "model_index.json"
    codec = _codec(json.loads(index.read_text()), lambda cls, name: cls.from_pretrained(path / name)) if index.is_file() else None
    return BaseModel(unet, _ddpm_from_config(sched_cfg), codec)


def _codec(model_index: dict, load: Callable[[type, str], torch.nn.Module]) -> Codec | None:
    """The frozen autoencoder a pipeline's model_index.json names (`vqvae` or `vae`), None when it names none.

    Only diffusers' own autoencoder classes are loaded (`CODEC_CLASSES`), by name, never code the folder ships."""
    for name in CODEC_COMPONENTS:
        entry = model_index.get(name)
        if not entry:
            continue
        library, cls_name = entry
        if library != "diffusers" or cls_name not in CODEC_CLASSES:
            raise ValueError(f"model_index.json: component {name!r} is {library}.{cls_name}; a latent model's autoencoder "
                             f"must be one of diffusers' {', '.join(CODEC_CLASSES)}")
        return Codec(load(getattr(diffusers, cls_name), name).float().eval(), name)
    return None


def _load_hub(hub_id: str, subfolder: str | None) -> BaseModel:
    """Hub repos keep the UNet either at the root (google/ddpm-*) or in `unet/` (pipelines)."""
    tries = [subfolder] if subfolder else [None, "unet"]
    errors = []
    for sub in tries:
        try:
            unet = UNet2DModel.from_pretrained(hub_id, subfolder=sub).float().eval()
            break
        except (OSError, ValueError, EnvironmentError) as exc:  # not found at this place / offline cache miss
            errors.append(f"subfolder={sub!r}: {exc}")
    else:
        raise OSError(
            f"could not load UNet2DModel {hub_id!r} from the Hugging Face hub or its local cache "
            f"({'; '.join(errors)}); when offline, pre-download it with `hf download {hub_id}` "
            "or point base_model.source at a local diffusers directory"
        )
    sched_cfg = None
    for sub in ("scheduler", None):
        try:
            sched_cfg = dict(DDPMScheduler.load_config(hub_id, subfolder=sub))
            break
        except (OSError, ValueError, EnvironmentError):
            continue
    try:
        index = dict(diffusers.DiffusionPipeline.load_config(hub_id))
    except (OSError, ValueError, EnvironmentError):  # a bare UNet repository has no model_index.json
        index = {}
    codec = _codec(index, lambda cls, name: cls.from_pretrained(hub_id, subfolder=name))
    return BaseModel(unet, _ddpm_from_config(sched_cfg), codec)


def _ddpm_from_config(cfg: dict | None) -> DDPMScheduler:
    if not cfg:
        return default_scheduler()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(cfg)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: each key (UTF-8) then its tensor's raw bytes, in sorted key order.

    Names the exact weights (and dtype) a model holds, whichever file or device they came from; one pass over the
    bytes, cheap next to loading them.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
