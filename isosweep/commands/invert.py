"""`isosweep invert MODEL IMAGES... --steps N --out DIR`: a user's own images back to their x_T, for editing.

Each image is loaded as the training data is (center crop to the model's size), DDIM-inverted (`core.inversion`)
and drawn again from its x_T by the same DDIM schedule; how far the redraw lies from the image says how far the
x_T can be trusted as that image's latent (docs/editing.md). Nothing is written until every image is done, and
bad input (no images, an unreadable file, steps < 1, an --out that holds files) is refused before any is inverted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isosweep.commands.models import load_model
from isosweep.console import result
from isosweep.constants import EXIT_COMPLETED
from isosweep.core.inversion import ddim_invert
from isosweep.core.sampling import ddim_sample, sample_shape
from isosweep.data.datasets import load_image
from isosweep.data.imagefiles import ImageFileError, list_images
from isosweep.data.images import round_trip_grid, save_png, to_uint8
from isosweep.evaluation.features.common import BackboneUnavailable
from isosweep.evaluation.features.resolver import load_feature_networks
from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.record import metric_text
from isosweep.evaluation.suite import full_float32_matmul
from isosweep.redact import scrub_text
from isosweep.spec import SpecError, load_spec

X_T_FILE, REPORT_FILE, RECONSTRUCTIONS, ROUND_TRIP = "x_T.npy", "inversion.json", "reconstructions", "round_trip.png"
ROUND_TRIP_IMAGES = 8  # the first images shown in round_trip.png


def image_paths(items: list[str]) -> list[Path]:
    """The image files named on the command line, a folder standing for its images (sorted); SpecError when one
    does not exist or there are none."""
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise SpecError(f"{item}: a folder with no PNG/JPEG/WebP images; fix: name image files or a folder of them")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SpecError(f"{item}: no such file or folder")
    if not files:
        raise SpecError("no images given; fix: name at least one PNG/JPEG file or folder after the model")
    return files


def _check_arguments(args: argparse.Namespace) -> Path:
    """The --out folder, once the numbers are sane and it is new or empty."""
    if args.steps < 1 or args.refine < 0 or args.batch_size < 1:
        raise SpecError(f"--steps and --batch-size must be at least 1 and --refine at least 0 "
                        f"(got {args.steps}, {args.batch_size}, {args.refine})")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"--out {out} exists and is not an empty folder; fix: choose a new folder")
    return out


def model_images(files: list[Path], unet) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] at the model's size; SpecError naming a file that cannot be read."""
    channels, height, width = sample_shape(unet)
    if channels != 3 or height != width:
        raise SpecError(f"the model draws {channels}x{height}x{width} images; invert reads RGB images into square models only")
    try:
        return torch.stack([load_image(f, height) for f in files])
    except ImageFileError as exc:  # a broken file is bad input; a storage error (ImageReadError) stays an error
        raise SpecError(f"{exc.path}: cannot be read as an image ({exc.reason}); fix: re-encode it or leave it out") from None


def invert_command(args: argparse.Namespace) -> int:
    """`isosweep invert MODEL IMAGES... --steps N --out DIR [--refine K] [--batch-size B] [--device D] [--spec S]`."""
    t0 = time.time()
    out = _check_arguments(args)
    files = image_paths(args.images)
    spec = load_spec(args.spec, args.overrides, check_paths=False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet, scheduler = load_model(args.model, args.tracking_uri)
    images = model_images(files, unet)  # every file decoded before the distance's network is loaded (or trained)
    try:
        nets = load_feature_networks(spec.evaluation, spec.dataset, needs=("ppl",), device=device)
    except BackboneUnavailable as exc:
        raise SpecError(f"{args.spec}: field 'evaluation.backbone': {exc}") from None
    with full_float32_matmul():  # TF32 off on a GPU, as for the metrics
        x_T = ddim_invert(unet.to(device), scheduler, images, args.steps, refine=args.refine, batch_size=args.batch_size,
                          progress=True)
        redrawn = ddim_sample(unet, scheduler, x_T, args.steps, batch_size=args.batch_size, progress=True).images
        perceptual = nets.distance(images, redrawn).double().numpy()
    mse = ((redrawn.double() - images.double()) ** 2).flatten(1).mean(dim=1).numpy()
    report = _report(args, files, x_T, mse, perceptual, nets.names["ppl"], spec.evaluation, str(device))
    _write(out, files, x_T, images, redrawn, report, time.time() - t0)
    result(f"inverted {len(files)} image(s) with DDIM {args.steps} steps (refine {args.refine}) into {out}: "
           f"reconstruction MSE {metric_text(report, 'mse')}, {report['perceptual_distance']} distance "
           f"{metric_text(report, 'perceptual')}")
    return EXIT_COMPLETED


def _report(args, files: list[Path], x_T: torch.Tensor, mse: np.ndarray, perceptual: np.ndarray, distance_name: str,
            eval_spec, device: str) -> dict:
    """inversion.json: per image and overall, each mean with its bootstrap interval over the images."""
    boot = dict(resamples=eval_spec.bootstrap.resamples, level=eval_spec.bootstrap.level, seed=eval_spec.seed)
    report = {"model": scrub_text(args.model), "steps": args.steps, "refine": args.refine, "device": device,
              "x_T": X_T_FILE, "round_trip": ROUND_TRIP, "x_T_shape": list(x_T.shape), "perceptual_distance": distance_name,
              "mse": float(mse.mean()), **mean_interval("mse", mse, **boot),
              "perceptual": float(perceptual.mean()), **mean_interval("perceptual", perceptual, **boot),
              "bootstrap": boot, "images": []}
    for i, path in enumerate(files):
        report["images"].append({"index": i, "file": str(path), "reconstruction": f"{RECONSTRUCTIONS}/{_png_name(i, path)}",
                                 "mse": float(mse[i]), "perceptual": float(perceptual[i]),
                                 "x_T_std": float(x_T[i].double().std())})
    return report


def _png_name(index: int, path: Path) -> str:
    return f"{index:04d}_{path.stem}.png"


def _write(out: Path, files: list[Path], x_T: torch.Tensor, images: torch.Tensor, redrawn: torch.Tensor, report: dict,
           wall_s: float) -> None:
    """x_T.npy (float32, no pickle), one PNG per reconstruction, round_trip.png (the first images over their
    reconstructions, as the suite's inversion_strip) and inversion.json."""
    (out / RECONSTRUCTIONS).mkdir(parents=True, exist_ok=True)
    np.save(out / X_T_FILE, x_T.float().numpy(), allow_pickle=False)
    for i, (path, image) in enumerate(zip(files, to_uint8(redrawn.numpy()))):
        save_png(Image.fromarray(image), out / RECONSTRUCTIONS / _png_name(i, path))
    save_png(round_trip_grid(images[:ROUND_TRIP_IMAGES].numpy(), redrawn[:ROUND_TRIP_IMAGES].numpy()), out / ROUND_TRIP)
    (out / REPORT_FILE).write_text(json.dumps({**report, "wall_s": round(wall_s, 2)}, indent=2) + "\n")
