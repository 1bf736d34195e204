"""The built-in base model: a small UNet pretrained on `shapes` and cached, so the demo needs no download.

`builtin:shapes` is trained by `pretrain_builtin` and cached under `<cache>/shapes-<hash of its recipe>`
(cache: base_model.cache_dir, $ISOSWEEP_CACHE/models, or ~/.cache/isosweep/models); a rerun with the
same recipe reuses it. It predicts x_0 ("sample"): on the flat-background shapes data that gives clean
samples after 600 CPU steps, where epsilon prediction still leaves grey noise after 1,500
(docs/training.md, bench/pretrain_targets.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from isosweep.core.progress import progress_bar
from isosweep.core.ema import EMA
from isosweep.core.losses import add_noise, denoising_target
from isosweep.core.sampling import ddim_sample, initial_noise, sample_shape
from isosweep.data.datasets import ShapesDataset
from isosweep.data.images import make_grid
from isosweep.files import atomic_directory

_PRETRAIN_VERSION = 2  # bump when the recipe below changes, so old caches are not reused
BUILTIN_PREDICTION_TYPE = "sample"


def default_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPM, linear betas 1e-4..0.02 (docs/math.md section 1); epsilon prediction unless told otherwise."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type, clip_sample=True)


def builtin_unet_config(resolution: int = 32) -> dict[str, Any]:
    """The built-in shapes UNet: 3 levels (16, 32, 64 channels), attention only in the mid block.

    About 0.64 M parameters; the bottleneck H is 64 x (R/4) x (R/4) (64x8x8 at 32 px).
    """
    return dict(
        sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32, add_attention=True,
    )


def _pretrain_recipe(base_model_spec, dataset_spec) -> dict[str, Any]:
    res = dataset_spec.resolution if dataset_spec is not None and dataset_spec.kind == "shapes" else 32
    size = dataset_spec.size if dataset_spec is not None and dataset_spec.kind == "shapes" else 4096
    seed = dataset_spec.seed if dataset_spec is not None and dataset_spec.kind == "shapes" else 0
    return dict(
        version=_PRETRAIN_VERSION, unet=builtin_unet_config(res), dataset=dict(kind="shapes", resolution=res, size=size, seed=seed),
        steps=base_model_spec.pretrain_steps, batch_size=base_model_spec.pretrain_batch_size,
        lr=2e-3, warmup=100, ema_decay=0.995, timesteps=1000, prediction_type=BUILTIN_PREDICTION_TYPE, seed=0,
    )


def cache_root(base_model_spec=None) -> Path:
    if base_model_spec is not None and base_model_spec.cache_dir:
        return Path(os.path.expanduser(base_model_spec.cache_dir))
    if os.environ.get("ISOSWEEP_CACHE"):
        return Path(os.path.expanduser(os.environ["ISOSWEEP_CACHE"])) / "models"
    return Path.home() / ".cache" / "isosweep" / "models"


def builtin_model_dir(base_model_spec, dataset_spec=None) -> Path:
    """Where `pretrain_builtin` caches the model for this config (it may not exist yet)."""
    recipe = _pretrain_recipe(base_model_spec, dataset_spec)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root(base_model_spec) / f"shapes-{digest}"


def pretrain_builtin(base_model_spec, dataset_spec=None, *, force: bool = False, progress: bool = True) -> Path:
    """Train (or reuse) the built-in shapes DDPM; returns its DDPMPipeline directory.

    x_0 prediction, Adam at lr 2e-3 (linear warmup, cosine decay) for `pretrain_steps` steps of
    `pretrain_batch_size` images, EMA 0.995, CPU float32. The result is written to a temporary directory beside the cache
    entry and renamed into place, so concurrent callers never see a half-written model: if two
    train at once, the first rename wins and the other's copy is discarded.
    """
    target = builtin_model_dir(base_model_spec, dataset_spec)
    if (target / "model_index.json").is_file() and not force:
        return target
    recipe = _pretrain_recipe(base_model_spec, dataset_spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe["seed"])
    unet = UNet2DModel(**recipe["unet"])
    scheduler = default_scheduler(recipe["timesteps"], recipe["prediction_type"])
    ds = recipe["dataset"]
    data = ShapesDataset(ds["size"], ds["resolution"], ds["seed"])
    images = torch.stack([data[i][0] for i in range(len(data))])  # the whole set fits in memory (50 MB)
    t0 = time.time()
    losses = pretrain_unet(unet, scheduler, images, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                           warmup=recipe["warmup"], ema_decay=recipe["ema_decay"], seed=recipe["seed"], progress=progress)
    with atomic_directory(target, replace=force) as tmp:  # concurrent callers never see a half-written model
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(
            dict(recipe=recipe, wall_s=round(time.time() - t0, 1), final_loss=float(np.mean(losses[-100:]))), indent=2))
    return target


def pretrain_unet(unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, *, steps: int, batch_size: int,
                  lr: float, warmup: int, ema_decay: float, seed: int, progress: bool = True,
                  weight: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """Pretrain `unet` in place on `images` (N, C, H, W) in the scheduler's prediction type and leave the EMA weights
    in it; returns the loss of every step. The recipe of `pretrain_builtin`: Adam at `lr` with a linear warm-up over
    `warmup` steps and cosine decay, gradients clipped to norm 1, EMA with diffusers' warm-up, batches and noise from
    one generator seeded `seed`. `weight(t)`, if given, weights each sample's squared error (a loss-weighting study,
    e.g. min-SNR); without it the loss is the plain mean squared error."""
    ema = EMA(unet, ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    prediction_type, timesteps = scheduler.config.prediction_type, scheduler.config.num_train_timesteps
    bar = _progress(steps, "pretrain shapes", progress)
    losses: list[float] = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, timesteps, (batch_size,), generator=gen)
        xt = add_noise(x0, noise, t, alphas)
        wanted = denoising_target(prediction_type, x0, noise, t, alphas)
        if weight is None:
            loss = torch.nn.functional.mse_loss(unet(xt, t).sample, wanted)
        else:
            loss = (((unet(xt, t).sample - wanted) ** 2).mean(dim=tuple(range(1, x0.dim()))) * weight(t)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining diverged at step {step}: dsm loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet)
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    bar.close()
    ema.copy_to(unet)
    unet.eval()
    return losses


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def sample_grid(unet: UNet2DModel, scheduler: DDPMScheduler, n: int = 16, steps: int = 50, seed: int = 0) -> np.ndarray:
    """n DDIM samples (eta = 0, latents `initial_noise(n, shape, seed)`) tiled: uint8 (rows*H, cols*W, 3)."""
    x_T = initial_noise(n, sample_shape(unet), seed)
    images = ddim_sample(unet, scheduler, x_T, steps, batch_size=n, progress=False).images
    return np.asarray(make_grid(images.numpy()).convert("RGB"))
