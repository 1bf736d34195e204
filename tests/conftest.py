"""Shared test settings: quiet, small, CPU-only unless a test is marked gpu."""

import os
from pathlib import Path

import pytest

# Tests start their own Ray clusters; the dashboard costs a GB and a few seconds each time.
os.environ.setdefault("ISOSWEEP_RAY_DASHBOARD", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA exists and are skipped, saying why, where it does not."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on 2 shared cores several threads per process oversubscribe
    them (autodiff runs 10-20x slower). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """(shared by the loop and checkpoint-selection tests) A tiny DDPM pipeline directory (8x8 images) standing in for a pretrained base model."""
    import torch
    from diffusers import DDPMPipeline, UNet2DModel

    from isosweep.models.builtin import default_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    d = tmp_path_factory.mktemp("base") / "pipe"
    DDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(d)
    return d


# CompVis/ldm-celebahq-256's layout (LDMPipeline: vqvae, unet, scheduler) with shrunk widths: 16 px images, 8x8 latents of
# 4 channels (the repository has 3; 4 tells the latents from the images by shape), and the repository's DDIM schedule
LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                     clip_sample=False, set_alpha_to_one=True, steps_offset=0)


@pytest.fixture(scope="module")
def tiny_ldm_dir(tmp_path_factory):
    """A tiny latent diffusion pipeline folder as LDMPipeline.save_pretrained writes it (model_index.json, vqvae/, unet/,
    scheduler/): a VQModel from config (one downsampling, so 16 px images to 8x8 latents) and a latent UNet2DModel,
    random weights (seed 0)."""
    import torch
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                    latent_channels=4, num_vq_embeddings=32, vq_embed_dim=4, norm_num_groups=4, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    d = tmp_path_factory.mktemp("ldm") / "pipe"
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(**LDM_SCHEDULER)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def isosweep_cache_dir(tmp_path_factory):
    """One ISOSWEEP_CACHE folder for every module's sweeps (each module's `cache_env` points at it): the built-in base
    model and the domain network of a recipe are trained once per session, not once per module. ISOSWEEP_TEST_CACHE
    names a folder to keep them in across sessions instead (entries are keyed by their recipe)."""
    kept = os.environ.get("ISOSWEEP_TEST_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("isosweep-cache")


# The servers and the multi-node cluster are session fixtures registered here, once for the whole run:
# imported into each test module instead, every module would start its own (about 10 s and 0.5 GB each).
# Stand-ins for what tests cannot download: the paper's hub models in a real HF cache (built once per session).
from support.hub import hub_cache, hub_cache_real  # noqa: E402,F401
from support.photos import photo_datasets  # noqa: E402,F401
from support.ray_cluster import ray_cluster  # noqa: E402,F401
from support.servers import mlflow_server, s3_server  # noqa: E402,F401
from support.weights import standard_weights  # noqa: E402,F401


@pytest.fixture
def image_files(tmp_path) -> list[Path]:
    """(shared by the inversion and editing tests) Two PNGs of other sizes than the tiny model's (one not square:
    center-cropped as training images are)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.png", (12, 12)), ("b.png", (20, 14))):
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def fast_domain(monkeypatch, tmp_path):
    """(shared by the inversion and editing tests) The demo spec's perceptual distance (the domain network) from a
    short training recipe, cached under tmp_path."""
    from isosweep.evaluation.features import domain

    monkeypatch.setattr(domain, "_DOMAIN_RECIPE", {**domain._DOMAIN_RECIPE, "steps": 20, "batch_size": 16, "train_size": 256})
    monkeypatch.setenv("ISOSWEEP_CACHE", str(tmp_path / "cache"))
