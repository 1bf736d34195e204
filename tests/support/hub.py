"""Stand-ins for the paper's hub models in a real Hugging Face cache, so `base_model.source: google/...` loads offline.

Tests cannot reach the hub. For each hub id the shipped specs name, `build_hub_cache` writes what
`hf download <id>` leaves in `HF_HUB_CACHE`: `models--google--<name>/` with `refs/main` (the
commit of main), `blobs/` (files named by their git sha1, LFS files by their sha256) and
`snapshots/<commit>/...`, each file a relative symlink into `blobs/`, as huggingface_hub writes them. The
file list and the config files are the repository's own; only the weights are random (seed 0), written by
diffusers' `save_pretrained` in the format the repository ships (pickle-free torch zip `.bin` and/or
`.safetensors`: three of the four repositories ship a `.bin` only, as a real cache of them holds).

Two sizes: `fast` keeps each repository's block types, attention levels, layers per block and sample size
but narrows the widths (8-32 channels), so a training step and a small evaluation at the real resolution
take seconds on a CPU; `real` is the repository's config unchanged (celebahq-256: 113.7 M parameters,
455 MB of weights).

Fixtures (registered in tests/conftest.py):

    def test_x(hub_cache):                   # fast stand-ins of all four ids, built once per session
        env = {**os.environ, **hub_cache.env}  # HF_HUB_CACHE, HF_HUB_OFFLINE=1 for a subprocess
        subprocess.run([..., "isosweep", "run", "search_spaces/celebahq.yaml", ...], env=env)

    def test_y(hub_cache_real):              # the real-size celebahq-256 entry, built on first use

`scheduler_changes` writes a scheduler_config.json that differs from the repository's, for tests that
must tell the repository's scheduler from the built-in default (which it equals).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash, sha_fileobj

CELEBAHQ = "google/ddpm-ema-celebahq-256"
CIFAR10 = "google/ddpm-cifar10-32"
CHURCH = "google/ddpm-ema-church-256"
BEDROOM = "google/ddpm-ema-bedroom-256"
HUB_IDS = (CELEBAHQ, CIFAR10, CHURCH, BEDROOM)

REAL_CELEBAHQ_PARAMS = 113_673_219  # UNet2DModel of the repository's config.json (113.7 M)

# The repositories' config.json: the keys diffusers 0.1 wrote in July 2022 (converted from the original
# TensorFlow checkpoints); later diffusers versions fill in the keys they added with their defaults.
_UNET_256 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
_UNET_32 = {
    **_UNET_256,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# `fast`: the same levels and blocks, narrow channels (GroupNorm's groups divide every width)
_FAST_WIDTHS = {256: {"block_out_channels": [8, 8, 16, 16, 32, 32], "norm_num_groups": 8},
                32: {"block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}}

_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
_MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}
_IMAGES = tuple(f"images/generated_image_{i}.png" for i in range(4))
_LFS_SUFFIXES = (".bin", ".safetensors")  # stored through git LFS: their blob is named by the sha256


@dataclass(frozen=True)
class HubRepo:
    """One hub repository as its main branch holds it (files at the root: a UNet directory and a pipeline's
    model_index.json, no unet/ or scheduler/ folder)."""

    repo_id: str
    commit: str  # main's head
    unet_config: dict
    weights: tuple[str, ...]  # weight files at the root
    other_files: tuple[str, ...]  # README.md, .gitattributes, sample images, the legacy modeling_ddpm.py

    @property
    def folder(self) -> str:
        return repo_folder_name(repo_id=self.repo_id, repo_type="model")


# Layouts: the repositories' "Files and versions" pages and commit histories on huggingface.co (main's last
# commit: celebahq 4cb6117 "Update README.md", Nov 2022, as fine-tuned models record it in `_name_or_path`;
# cifar10 267b167 "Adding `safetensors` variant of this model (#14)", Aug 2023; church adb3310 and bedroom
# df329a8, "Update README.md", Nov 2022). The configs: the repositories' config.json as fine-tunes of them
# copy it (diffusers' unconditional training example starting from google/ddpm-celebahq-256 or -cifar10-32).
REPOS = {
    CELEBAHQ: HubRepo(CELEBAHQ, "4cb6117472e6e4f45c5afe606b101858c27c3802", _UNET_256, ("diffusion_pytorch_model.bin",),
                      (".gitattributes", "README.md", *_IMAGES)),
    CIFAR10: HubRepo(CIFAR10, "267b167dc01f0e4e61923ea244e8b988f84deb80", _UNET_32,
                     ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
                     (".gitattributes", "README.md", "modeling_ddpm.py", *_IMAGES)),
    CHURCH: HubRepo(CHURCH, "adb3310e276abf2c09ef3e2bb8b1946b47b1468d", _UNET_256, ("diffusion_pytorch_model.bin",),
                    (".gitattributes", "README.md", *_IMAGES)),
    BEDROOM: HubRepo(BEDROOM, "df329a8d5319a212e813ba83427e4af56760c35f", _UNET_256, ("diffusion_pytorch_model.bin",),
                     (".gitattributes", "README.md", *_IMAGES)),
}


def unet_config(repo_id: str, size: str = "fast") -> dict:
    """The config.json the stand-in of `repo_id` gets: the repository's (`real`) or its narrow twin (`fast`)."""
    cfg = dict(REPOS[repo_id].unet_config)
    if size == "fast":
        cfg.update(_FAST_WIDTHS[cfg["sample_size"]])
    elif size != "real":
        raise ValueError(f"size must be 'fast' or 'real', not {size!r}")
    return cfg


def _text_file(repo: HubRepo, name: str) -> bytes:
    if name == ".gitattributes":
        return "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in (".bin", ".pt", ".safetensors", ".ckpt")).encode()
    if name == "README.md":
        return (f"---\nlicense: apache-2.0\ntags:\n- pytorch\n- diffusers\n- unconditional-image-generation\n---\n\n"
                f"# {repo.repo_id} (test stand-in: the repository's layout and configs, random weights)\n").encode()
    if name == "modeling_ddpm.py":  # the pipeline file the first upload carried; diffusers never imports it
        return b"# legacy pipeline file of the first upload; model_index.json names diffusers' DDPMPipeline instead\n"
    raise KeyError(name)


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_weights(repo: HubRepo, cfg: dict, seed: int, staging: Path) -> dict[str, Path]:
    """The repository's weight files for a UNet2DModel of `cfg`, initialised from `seed`, via save_pretrained."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    out = {}
    for name in repo.weights:
        d = staging / name.replace(".", "_")
        unet.save_pretrained(d, safe_serialization=name.endswith(".safetensors"))
        out[name] = d / name
    return out


def _add_blob(root: Path, snapshot: Path, name: str, src: Path) -> None:
    """Move `src` into blobs/ under the name the hub gives it and link snapshot/name to it (relative link)."""
    with open(src, "rb") as fh:
        blob = sha_fileobj(fh).hex() if name.endswith(_LFS_SUFFIXES) else git_hash(fh.read())
    blob_path = root / "blobs" / blob
    if not blob_path.exists():
        shutil.move(str(src), blob_path)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(blob_path, link.parent), link)


def write_repo(cache: Path, repo_id: str, *, size: str = "fast", seed: int = 0, scheduler_changes: dict | None = None) -> Path:
    """Write the stand-in of `repo_id` into the hub cache folder `cache`; returns its snapshot folder."""
    repo = REPOS[repo_id]
    cfg = unet_config(repo_id, size)
    root = Path(cache) / repo.folder
    snapshot = root / "snapshots" / repo.commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / hf_constants.DEFAULT_REVISION).write_text(repo.commit)  # no newline, as the hub writes it
    with tempfile.TemporaryDirectory(dir=root, prefix=".staging-") as tmp:
        staging = Path(tmp)
        files: dict[str, bytes] = {
            "config.json": json.dumps(cfg, indent=2).encode() + b"\n",
            "scheduler_config.json": json.dumps({**_SCHEDULER, **(scheduler_changes or {})}, indent=2).encode() + b"\n",
            "model_index.json": json.dumps(_MODEL_INDEX, indent=2).encode() + b"\n",
        }
        for i, name in enumerate(repo.other_files):
            files[name] = _png(i) if name.endswith(".png") else _text_file(repo, name)
        for i, (name, data) in enumerate(files.items()):
            src = staging / f"file-{i}"
            src.write_bytes(data)
            _add_blob(root, snapshot, name, src)
        for name, path in _write_weights(repo, cfg, seed, staging).items():
            _add_blob(root, snapshot, name, path)
    return snapshot


# CompVis/ldm-celebahq-256: an LDMPipeline folder (model_index.json, vqvae/, unet/, scheduler/) on main
LDM_CELEBAHQ = "CompVis/ldm-celebahq-256"
LDM_CELEBAHQ_COMMIT = "1" * 40  # the stand-in's own commit name, not the repository's


def write_pipeline_repo(cache: Path, repo_id: str, commit: str, pipeline_dir: Path) -> Path:
    """A hub cache entry of `repo_id` holding the files of the saved pipeline folder `pipeline_dir` (its subfolders
    as they are, weights as LFS blobs, every file a relative link into blobs/); returns its snapshot folder."""
    root = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / hf_constants.DEFAULT_REVISION).write_text(commit)
    with tempfile.TemporaryDirectory(dir=root, prefix=".staging-") as tmp:
        for i, path in enumerate(sorted(p for p in Path(pipeline_dir).rglob("*") if p.is_file())):
            src = Path(tmp) / f"file-{i}"
            shutil.copyfile(path, src)
            _add_blob(root, snapshot, path.relative_to(pipeline_dir).as_posix(), src)
    return snapshot


def build_hub_cache(cache: Path | str, repo_ids: tuple[str, ...] = HUB_IDS, *, size: str = "fast", seed: int = 0,
                    scheduler_changes: dict | None = None) -> Path:
    """A hub cache folder holding the stand-ins of `repo_ids` (see the module docstring)."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for rid in repo_ids:
        write_repo(cache, rid, size=size, seed=seed, scheduler_changes=scheduler_changes)
    return cache


@dataclass(frozen=True)
class HubCache:
    """A built hub cache: `path` is the HF_HUB_CACHE folder; `env` the variables a process needs to read it offline."""

    path: Path
    repo_ids: tuple[str, ...]
    size: str

    @property
    def env(self) -> dict[str, str]:
        return {"HF_HUB_CACHE": str(self.path), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def snapshot(self, repo_id: str) -> Path:
        """The snapshot folder of `repo_id` (what the hub id resolves to)."""
        repo = REPOS[repo_id]
        return self.path / repo.folder / "snapshots" / repo.commit


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> HubCache:
    """The fast stand-ins of the four hub ids the shipped specs name, in one hub cache (about 2 s to build)."""
    path = build_hub_cache(tmp_path_factory.mktemp("hf-hub-fast"), HUB_IDS, size="fast")
    return HubCache(path, HUB_IDS, "fast")


@pytest.fixture(scope="session")
def hub_cache_real(tmp_path_factory) -> HubCache:
    """The real-size google/ddpm-ema-celebahq-256 stand-in (113.7 M parameters, a 455 MB .bin), built on first use."""
    path = build_hub_cache(tmp_path_factory.mktemp("hf-hub-real"), (CELEBAHQ,), size="real")
    return HubCache(path, (CELEBAHQ,), "real")
