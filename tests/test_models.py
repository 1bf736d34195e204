"""Base-model loading (local dirs, a fake offline HF cache, MLflow-style layouts) and the builtin cache."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from isosweep.models.builtin import builtin_model_dir, default_scheduler, pretrain_builtin, sample_grid
from isosweep.models.loading import find_diffusers_dir, load_unet_and_scheduler
from isosweep.spec import BaseModelSpec, DatasetSpec


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


def test_builtin_pretrain_is_cached(tmp_path):
    bm = BaseModelSpec(source="builtin:shapes", pretrain_steps=2, pretrain_batch_size=2, cache_dir=str(tmp_path))
    ds = DatasetSpec(kind="shapes", size=8, resolution=8)
    path = pretrain_builtin(bm, ds, progress=False)
    assert path == builtin_model_dir(bm, ds) and path.parent == tmp_path
    info = (path / "pretrain.json").read_text()
    assert json.loads(info)["recipe"]["steps"] == 2
    assert pretrain_builtin(bm, ds, progress=False) == path and (path / "pretrain.json").read_text() == info  # reused
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed into place
    unet, sched = load_unet_and_scheduler(bm, ds, progress=False)
    assert unet.config.sample_size == 8 and sched.config.num_train_timesteps == 1000
    # the built-in model predicts x_0; fine-tuning and DDIM read it from the scheduler config
    assert sched.config.prediction_type == "sample" == json.loads(info)["recipe"]["prediction_type"]
    assert tuple(DDPMPipeline.from_pretrained(path).unet.config.block_out_channels) == (16, 32, 64)
    other = BaseModelSpec(source="builtin:shapes", pretrain_steps=3, pretrain_batch_size=2, cache_dir=str(tmp_path))
    assert builtin_model_dir(other, ds) != path  # the key is the recipe
    grid = sample_grid(unet, sched, n=4, steps=2)
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3) and grid.dtype.name == "uint8"


def test_hub_id_from_offline_cache(tmp_path, monkeypatch):
    """The real hub-loading code path, served from a fake Hugging Face cache (offline)."""
    import huggingface_hub.constants as hf_constants

    rev = "0" * 40
    repo = tmp_path / "models--isosweep-test--tiny-ddpm"
    snap = repo / "snapshots" / rev
    _tiny_unet().save_pretrained(snap)  # google/ddpm-* layout: UNet at the root + scheduler_config.json
    default_scheduler().save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    unet, sched = load_unet_and_scheduler(BaseModelSpec(source="isosweep-test/tiny-ddpm"))
    assert tuple(unet.config.block_out_channels) == (8, 16) and sched.config.beta_schedule == "linear"
    with pytest.raises(OSError, match="could not load UNet2DModel 'isosweep-test/missing'"):
        load_unet_and_scheduler(BaseModelSpec(source="isosweep-test/missing"))


def test_the_model_verbs_take_a_hub_id_from_the_offline_cache(hub_cache, tmp_path):
    """`isosweep sample google/...` loads the hub id as a spec's base_model.source does (offline, from the cache)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from tests.support.hub import CIFAR10

    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "isosweep", "sample", CIFAR10, "--n", "2", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **hub_cache.env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).size[1] == 32 + 2 * 2  # one row of two 32 px images inside the grid's 2 px border
    missing = subprocess.run([sys.executable, "-m", "isosweep", "sample", "google/not-cached", "--out", str(tmp_path / "x.png")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **hub_cache.env})
    assert missing.returncode == 1 and "could not load UNet2DModel 'google/not-cached'" in missing.stderr, missing.stderr[-2000:]


def test_find_diffusers_dir_in_mlflow_layout(tmp_path):
    pipe_dir = tmp_path / "artifacts" / "pipeline"
    DDPMPipeline(unet=_tiny_unet(), scheduler=default_scheduler()).save_pretrained(pipe_dir)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    assert find_diffusers_dir(tmp_path) == pipe_dir
    unet, _ = load_unet_and_scheduler(BaseModelSpec(source=str(pipe_dir)))
    assert isinstance(unet, UNet2DModel)
