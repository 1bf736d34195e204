"""`isosweep pretrain`, `pull`, `sample` and `interpolate`: the built-in base model and a registered model in use.

`sample`, `interpolate` and `pull` take a latent diffusion model too (its samples decoded to images); `invert` and
`edit`, which load through `load_model`, take pixel-space models only. `sample` and `interpolate` download a `models:/` or `runs:/` URI into a temporary folder that is removed
as soon as the weights are loaded, whether loading works or not; a `pull` that fails removes what it
put into `--out`, so the same command can be run again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from isosweep.console import result
from isosweep.constants import EXIT_COMPLETED
from isosweep.core.codec import Codec
from isosweep.core.sampling import ddim_sample, sample_shape
from isosweep.data.images import make_grid, make_strip, save_png, to_uint8
from isosweep.evaluation.metrics.paths import lerp, slerp
from isosweep.models.builtin import builtin_model_dir, pretrain_builtin, sample_grid
from isosweep.models.loading import BaseModel, load_base, load_local, load_local_base, pixel_only
from isosweep.models.sources import BUILTIN_SHAPES, is_model_uri
from isosweep.results.plots import distance_plot
from isosweep.spec import BaseModelSpec, SpecError, apply_overrides, load_spec, spec_from_dict
from isosweep.tracking.models import resolve_model
from isosweep.tracking.registry import PIPELINE_SUBPATH


def pretrain_command(args: argparse.Namespace) -> int:
    """`isosweep pretrain [SPEC] [--set ...] [--force] [--out grid.png]`."""
    if args.spec:
        spec = load_spec(args.spec, args.overrides)
    else:
        spec = spec_from_dict(apply_overrides({"name": "pretrain"}, args.overrides), source="--set")
    if spec.base_model.source != BUILTIN_SHAPES:
        result(f"base_model.source is {spec.base_model.source!r}: nothing to pretrain (only builtin:shapes is trained here)")
        return EXIT_COMPLETED
    target = builtin_model_dir(spec.base_model, spec.dataset)
    cached = (target / "model_index.json").is_file() and not args.force
    t0 = time.time()
    path = pretrain_builtin(spec.base_model, spec.dataset, force=args.force)
    wall = time.time() - t0
    info = json.loads((path / "pretrain.json").read_text()) if (path / "pretrain.json").is_file() else {}
    if cached:
        result(f"reused cached base model {path} (trained in {info.get('wall_s', '?')} s; --force retrains)")
    else:
        result(f"pretrained base model in {wall:.0f} s ({info.get('recipe', {}).get('steps')} steps, "
              f"final dsm loss {info.get('final_loss', float('nan')):.4f}): {path}")
    if args.out:
        unet, scheduler = load_local(path, None)
        grid = Image.fromarray(sample_grid(unet, scheduler, n=64, steps=50, seed=0))
        grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(args.out)  # 3x: visible at a glance
        result(f"wrote 64 DDIM samples (50 steps) to {args.out}")
    return EXIT_COMPLETED


def pull_command(args: argparse.Namespace) -> int:
    """`isosweep pull MODEL_URI --out DIR`: download, load with DDPMPipeline, 1-step sample, print the path."""
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # also checked by the CLI before torch is imported
        raise SpecError(f"--out {out} exists and is not an empty folder; fix: choose a new folder")
    created = not out.exists()
    try:
        if is_model_uri(args.model_uri):
            pipe_dir = resolve_model(args.model_uri, args.tracking_uri, dst=out)
        else:
            shutil.copytree(resolve_model(args.model_uri), out / PIPELINE_SUBPATH, dirs_exist_ok=True)
            pipe_dir = out / PIPELINE_SUBPATH
        base = load_local_base(pipe_dir, None)
        unet = base.unet
        img = _ddim(unet, base.scheduler, seed_noise(0, sample_shape(unet)), 1, base.codec)
        if not np.isfinite(img).all():
            raise RuntimeError(f"{args.model_uri}: a 1-step sample is not finite; the model is broken")
    except BaseException:  # a half-downloaded --out would refuse the next try ("exists and is not empty")
        _remove_partial(out, created)
        raise
    n_params = sum(p.numel() for p in unet.parameters())
    result(f"pulled {args.model_uri} -> {out}")
    kind, drawn = ("DDPMPipeline", "images") if base.codec is None else ("LDMPipeline", "latents")
    result(f"diffusers pipeline: {pipe_dir}  ({kind}.from_pretrained loads it; UNet {n_params / 1e6:.2f}M params, "
          f"{'x'.join(map(str, sample_shape(unet)))} {drawn})")
    return EXIT_COMPLETED


def _remove_partial(out: Path, created: bool) -> None:
    """Remove what a failed pull wrote: `out` itself when the pull created it, else its contents (it was empty)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir() if out.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def load_model(model: str, tracking_uri: str | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler of a pixel-space model (`load_base_model`); a latent model is refused
    (`models.loading.LatentModelError`, exit 2)."""
    return pixel_only(load_base_model(model, tracking_uri), model)


def load_base_model(model: str, tracking_uri: str | None = None) -> BaseModel:
    """A model and, for a latent model, its codec (`models.loading.BaseModel`): a folder; a hub id (the local Hugging Face
    cache when offline) or the built-in model, loaded as a spec's `base_model.source` is; or a `models:/` / `runs:/` URI
    downloaded into a temporary folder that is removed once the weights are in memory (on every exit path)."""
    if not is_model_uri(str(model)):
        if not Path(model).expanduser().exists():
            return load_base(BaseModelSpec(source=str(model)), None)
        return load_local_base(resolve_model(model), None)
    with tempfile.TemporaryDirectory(prefix="isosweep-model-", ignore_cleanup_errors=True) as tmp:
        return load_local_base(resolve_model(model, tracking_uri, dst=tmp), None)


def sample_grid_image(model: str, n: int, steps: int, seed: int, tracking_uri: str | None = None) -> Image.Image:
    """A PIL grid of n DDIM samples of a model dir or URI (seed -> the initial noise (n, C, H, W); a latent model's
    samples decoded)."""
    base = load_base_model(model, tracking_uri)
    return make_grid(to_uint8(_ddim(base.unet, base.scheduler, seed_noise(seed, sample_shape(base.unet), n), steps, base.codec)))


def sample_command(args: argparse.Namespace) -> int:
    """`isosweep sample MODEL --n 16 --steps 50 --seed 0 --out grid.png`."""
    if args.n < 1 or args.steps < 1:  # also checked by the CLI before torch is imported
        raise SpecError(f"--n and --steps must be at least 1 (got {args.n}, {args.steps})")
    path = save_png(sample_grid_image(args.model, args.n, args.steps, args.seed, args.tracking_uri), args.out)
    result(f"wrote {path} ({args.n} samples, DDIM {args.steps} steps, seed {args.seed})")
    return EXIT_COMPLETED


def interpolation_frames(unet, scheduler, seeds: Sequence[int], frames: int, mode: str, steps: int,
                         codec: Codec | None = None) -> np.ndarray:
    """Images (frames, C, H, W) in [-1, 1] along the slerp/lerp path between two seeds' initial noise (a latent
    model's path in its latent noise, each frame decoded)."""
    shape = sample_shape(unet)
    a, b = seed_noise(seeds[0], shape), seed_noise(seeds[1], shape)
    s = torch.linspace(0.0, 1.0, frames)
    path = slerp if mode == "slerp" else lerp
    return _ddim(unet, scheduler, path(a.expand(frames, *shape), b.expand(frames, *shape), s), steps, codec)


def frame_distances(frames: np.ndarray) -> np.ndarray:
    """Pixel L2 distance between adjacent frames: (F, C, H, W) in [-1, 1] -> (F-1,), RMS per pixel."""
    d = frames[1:].astype(np.float64) - frames[:-1].astype(np.float64)
    return np.sqrt((d.reshape(len(d), -1) ** 2).mean(axis=1))


def interpolate_command(args: argparse.Namespace) -> int:
    """`isosweep interpolate MODEL --seeds 1 2 --frames 9 --mode slerp --steps 50 --out strip.png`.

    Writes the strip and, next to it, `<out stem>_distances.png` (adjacent-frame pixel L2, paper
    Fig. 6) and `<out stem>_distances.json`.
    """
    if args.frames < 2 or args.steps < 1:  # also checked by the CLI before torch is imported
        raise SpecError(f"--frames must be at least 2 and --steps at least 1 (got {args.frames}, {args.steps})")
    base = load_base_model(args.model, args.tracking_uri)
    frames = interpolation_frames(base.unet, base.scheduler, args.seeds, args.frames, args.mode, args.steps, base.codec)
    out = save_png(make_strip(to_uint8(frames)), args.out)
    dists = frame_distances(frames)
    plot = distance_plot(dists, out.with_name(out.stem + "_distances.png"),
                         f"{args.mode} seeds {args.seeds[0]}->{args.seeds[1]}, DDIM {args.steps} steps")
    out.with_name(out.stem + "_distances.json").write_text(json.dumps(
        {"mode": args.mode, "seeds": list(args.seeds), "steps": args.steps, "distance": "pixel_l2_rms", "values": dists.tolist()}
    ))
    result(f"wrote {out} ({args.frames} frames, {args.mode}) and {plot} (pixel L2 between adjacent frames)")
    return EXIT_COMPLETED


def _ddim(unet, scheduler, x_T: torch.Tensor, steps: int, codec: Codec | None = None) -> np.ndarray:
    """DDIM (eta = 0) from x_T (B, C, H, W): images (B, C, H, W) in [-1, 1] as numpy (decoded by `codec` if given)."""
    images = ddim_sample(unet, scheduler, x_T, steps, batch_size=16, progress=False).images
    return (images if codec is None else codec.decode(images)).numpy()


def seed_noise(seed: int, shape: tuple[int, int, int], n: int = 1) -> torch.Tensor:
    """The latents of `--seed` / `--seeds`: one generator seeded with the seed, (n, C, H, W)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(int(seed)))
