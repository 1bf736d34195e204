"""Base models: load a pretrained `UNet2DModel` + `DDPMScheduler` from anywhere, or pretrain the built-in one.

Sources (`base_model.source`):
- `builtin:shapes`: a small UNet trained from scratch on the `shapes` dataset by `pretrain_builtin`,
  cached under `<cache>/shapes-<hash of its config>` (cache: base_model.cache_dir, $ISOSWEEP_CACHE,
  or ~/.cache/isosweep/models); a rerun with the same config reuses it.
- a local diffusers directory: a pipeline directory (with `unet/`, or `base_model.subfolder`) or a
  bare UNet directory (config.json + weights).
- a hub id such as `google/ddpm-ema-celebahq-256` (read from the local HF cache when offline).
- an MLflow model URI (`models:/NAME@alias`, `runs:/RUN/model`): downloaded with
  `mlflow.artifacts.download_artifacts`; the artifact holds a diffusers pipeline directory.

The scheduler comes from the model's own scheduler config when there is one, converted to
`DDPMScheduler`; otherwise DDPM with linear betas and T = 1000 (MATH.md section 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
BUILTIN_SHAPES = "builtin:shapes"
_PRETRAIN_VERSION = 2  # bump when the recipe below changes, so old caches are not reused
# The built-in model predicts x_0 ("sample"): on the flat-background shapes data it gives clean samples
# after 600 CPU steps, where epsilon prediction still leaves grey noise after 1,500 (docs/training.md).
BUILTIN_PREDICTION_TYPE = "sample"


def default_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPM, linear betas 1e-4..0.02 (MATH.md section 1); epsilon prediction unless told otherwise."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type, clip_sample=True)


# ---------------------------------------------------------------------------------------------- loading


def load_unet_and_scheduler(base_model_spec, dataset_spec=None, *, progress: bool = True) -> tuple[UNet2DModel, DDPMScheduler]:
    """The base UNet (float32, eval mode, on CPU) and its DDPM scheduler, from any supported source.

    `dataset_spec` is only used by `builtin:shapes` (the resolution it is pretrained at).
    """
    src = base_model_spec.source
    if src == BUILTIN_SHAPES:
        return _load_local(pretrain_builtin(base_model_spec, dataset_spec, progress=progress), None)
    if src.startswith(MLFLOW_PREFIXES):
        return _load_local(_download_mlflow(src), base_model_spec.subfolder)
    local = Path(os.path.expanduser(src))
    if local.exists():
        return _load_local(local, base_model_spec.subfolder)
    return _load_hub(src, base_model_spec.subfolder)


def _load_local(path: Path | str, subfolder: str | None) -> tuple[UNet2DModel, DDPMScheduler]:
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
    return unet, _ddpm_from_config(sched_cfg)


def _load_hub(hub_id: str, subfolder: str | None) -> tuple[UNet2DModel, DDPMScheduler]:
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
            f"({'; '.join(errors)}); when offline, pre-download it with `huggingface-cli download {hub_id}` "
            "or point base_model.source at a local diffusers directory"
        )
    sched_cfg = None
    for sub in ("scheduler", None):
        try:
            sched_cfg = dict(DDPMScheduler.load_config(hub_id, subfolder=sub))
            break
        except (OSError, ValueError, EnvironmentError):
            continue
    return unet, _ddpm_from_config(sched_cfg)


def _ddpm_from_config(cfg: dict | None) -> DDPMScheduler:
    if not cfg:
        return default_scheduler()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(cfg)


def _download_mlflow(uri: str) -> Path:
    import mlflow  # only this branch needs MLflow

    dst = Path(tempfile.mkdtemp(prefix="isosweep-model-"))
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    found = find_diffusers_dir(root)
    if found is None:
        raise FileNotFoundError(f"{uri} downloaded to {root} but holds no diffusers directory (model_index.json or unet/config.json)")
    return found


def find_diffusers_dir(root: Path) -> Path | None:
    """The shallowest directory under `root` with model_index.json (a pipeline), else with a UNet config."""
    root = Path(root)
    for marker in ("model_index.json", "config.json"):
        hits = sorted(root.rglob(marker), key=lambda p: len(p.parts))
        if hits:
            return hits[0].parent
    return None


# ------------------------------------------------------------------------------------------ pretraining


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
    from isosweep.data import ShapesDataset
    from isosweep.losses import add_noise, denoising_target

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
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.Adam(unet.parameters(), lr=recipe["lr"])
    steps, bs, warm = recipe["steps"], recipe["batch_size"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(recipe["seed"])
    alphas = scheduler.alphas_cumprod
    bar = _progress(steps, "pretrain shapes", progress)
    t0, losses = time.time(), []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (bs,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, recipe["timesteps"], (bs,), generator=gen)
        xt = add_noise(x0, noise, t, alphas)
        wanted = denoising_target(recipe["prediction_type"], x0, noise, t, alphas)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, wanted)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining diverged at step {step}: dsm loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(recipe["ema_decay"], (1 + step) / (10 + step))
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - d)
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    bar.close()
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(
        dict(recipe=recipe, wall_s=round(time.time() - t0, 1), final_loss=float(np.mean(losses[-100:]))), indent=2))
    if force and target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def sample_grid(unet: UNet2DModel, scheduler: DDPMScheduler, n: int = 16, steps: int = 50, seed: int = 0) -> np.ndarray:
    """Sample n images with DDIM (eta = 0) and tile them: uint8 array (rows*H, cols*W, 3)."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    res = unet.config.sample_size
    size = res if isinstance(res, int) else res[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, unet.config.in_channels, size, size), generator=gen)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = np.full((rows * (size + pad) + pad, cols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (size + pad): pad + r * (size + pad) + size, pad + c * (size + pad): pad + c * (size + pad) + size] = im
    return grid


def pretrain_command(args) -> int:
    """`isosweep pretrain [SPEC] [--set ...] [--force] [--out grid.png]`."""
    from isosweep.config import SweepSpec, apply_overrides, load_spec, spec_from_dict

    if args.spec:
        spec = load_spec(args.spec, args.overrides)
    else:
        spec = spec_from_dict(apply_overrides({"name": "pretrain"}, args.overrides), source="--set")
    if spec.base_model.source != BUILTIN_SHAPES:
        print(f"base_model.source is {spec.base_model.source!r}: nothing to pretrain (only builtin:shapes is trained here)")
        return 0
    target = builtin_model_dir(spec.base_model, spec.dataset)
    cached = (target / "model_index.json").is_file() and not args.force
    t0 = time.time()
    path = pretrain_builtin(spec.base_model, spec.dataset, force=args.force)
    wall = time.time() - t0
    info = json.loads((path / "pretrain.json").read_text()) if (path / "pretrain.json").is_file() else {}
    if cached:
        print(f"reused cached base model {path} (trained in {info.get('wall_s', '?')} s; --force retrains)")
    else:
        print(f"pretrained base model in {wall:.0f} s ({info.get('recipe', {}).get('steps')} steps, "
              f"final dsm loss {info.get('final_loss', float('nan')):.4f}): {path}")
    if args.out:
        from PIL import Image

        unet, scheduler = _load_local(path, None)
        grid = Image.fromarray(sample_grid(unet, scheduler, n=64, steps=50, seed=0))
        grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(args.out)  # 3x: visible at a glance
        print(f"wrote 64 DDIM samples (50 steps) to {args.out}")
    return 0
