"""`isosweep edit MODEL --seed S... --t T --directions 0 1 2 --gamma G --out DIR`: Local Basis edits, as grids and numbers.

For each seed (its x_T is `isosweep sample --n 1 --seed S`'s) or each `--image` (DDIM-inverted to its x_T first),
DDIM runs down to the edit step t, the top directions of the encoder's Jacobian there are found (`core.editing`),
x_t + gamma v is drawn on to the image for every chosen direction (rows) and gamma (columns), and the edits are
measured (`evaluation.metrics.editing`): linearity and straightness along each row, and how far the directions of
different samples agree. docs/editing.md says what the numbers mean and what they cost. Bad input is refused
before the model is loaded; nothing is written until every sample is done.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from isosweep.commands.invert import image_paths, model_images
from isosweep.commands.models import load_model, seed_noise
from isosweep.console import result
from isosweep.constants import EXIT_COMPLETED
from isosweep.core.editing import edit_step_index
from isosweep.core.inversion import ddim_invert
from isosweep.core.sampling import ddim_scheduler, sample_shape
from isosweep.data.images import make_grid, save_png, to_uint8
from isosweep.evaluation.features.common import BackboneUnavailable
from isosweep.evaluation.features.resolver import load_feature_networks
from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.record import metric_text
from isosweep.evaluation.metrics.editing import EditedSample, agreement_per_sample, chance_agreement, edit_sample
from isosweep.evaluation.suite import full_float32_matmul
from isosweep.redact import scrub_text
from isosweep.spec import SpecError, load_spec

REPORT_FILE = "edit.json"


def parse_gamma(text: str) -> tuple[float, float]:
    """'G' -> (-G, G); 'LO..HI' -> (LO, HI); SpecError unless LO < HI."""
    try:
        lo, hi = (float(p) for p in text.split("..")) if ".." in text else (-abs(float(text)), abs(float(text)))
    except ValueError:
        raise SpecError(f"--gamma {text!r}: not G or LO..HI; fix: e.g. --gamma 40 or --gamma=-20..60") from None
    if not lo < hi:
        raise SpecError(f"--gamma {text!r}: the range is empty; fix: give G > 0 or LO..HI with LO < HI")
    return lo, hi


def _check_arguments(args: argparse.Namespace) -> tuple[Path, np.ndarray]:
    """The --out folder and the gammas, once every number is sane."""
    if args.steps < 1 or args.columns < 2 or args.iterations < 1 or args.batch_size < 1 or args.t < 0:
        raise SpecError(f"--steps, --iterations and --batch-size must be at least 1, --columns at least 2 and --t at "
                        f"least 0 (got {args.steps}, {args.iterations}, {args.batch_size}, {args.columns}, {args.t})")
    if not args.directions or min(args.directions) < 0 or min(args.combine or [0]) < 0:
        raise SpecError("--directions and --combine take indices 0, 1, 2 ... of the Local Basis (0: the largest)")
    if args.combine is not None and len(set(args.combine)) < 2:
        raise SpecError("--combine takes two directions at least, e.g. --combine 0 1")
    if args.image and args.seed:
        raise SpecError("give --seed or --image, not both")
    lo, hi = parse_gamma(args.gamma)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"--out {out} exists and is not an empty folder; fix: choose a new folder")
    return out, np.linspace(lo, hi, args.columns)


def edit_command(args: argparse.Namespace) -> int:
    """`isosweep edit MODEL [--seed S... | --image PATH...] --t T --gamma G [--directions I...] [--combine I I...]
    [--columns N] [--steps N] [--iterations N] --out DIR`."""
    t0 = time.time()
    out, gammas = _check_arguments(args)
    files = image_paths(args.image) if args.image else []
    spec = load_spec(args.spec, args.overrides, check_paths=False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet, scheduler = load_model(args.model, args.tracking_uri)
    unet = unet.to(device).eval()
    ddim = ddim_scheduler(scheduler, args.steps)
    timesteps = [int(t) for t in ddim.timesteps]
    try:
        at = edit_step_index(timesteps, args.t)
    except ValueError as exc:
        raise SpecError(f"--t: {exc}") from None
    k = max([*args.directions, *(args.combine or [])]) + 1
    if k > int(np.prod(sample_shape(unet))):
        raise SpecError(f"--directions: the model's X has {int(np.prod(sample_shape(unet)))} dimensions; fix: smaller indices")
    try:
        nets = load_feature_networks(spec.evaluation, spec.dataset, needs=("ppl",), device=device)
    except BackboneUnavailable as exc:
        raise SpecError(f"{args.spec}: field 'evaluation.backbone': {exc}") from None
    with full_float32_matmul():  # TF32 off on a GPU, as for the metrics
        x_T, names = _starts(args, files, unet, scheduler, device)
        samples = [edit_sample(unet, ddim, timesteps, at, x, k, args.directions, gammas, nets.distance,
                               combine=args.combine, iterations=args.iterations, batch_size=args.batch_size,
                               vectors_per_pass=args.vectors_per_pass) for x in x_T]
    report = _report(args, names, samples, gammas, timesteps[at], k, nets.names["ppl"], spec.evaluation, str(device))
    _write(out, names, samples, gammas, report, time.time() - t0)
    shown = ", ".join(f"{name} {metric_text(report, name, 3)}" for name in ("linearity_r2", "straightness", "consistency")
                      if name in report)
    result(f"edited {len(names)} sample(s) along {len(samples[0].rows)} direction(s) at t={timesteps[at]} into {out}: {shown}")
    return EXIT_COMPLETED


def _starts(args, files: list[Path], unet, scheduler, device) -> tuple[list[torch.Tensor], list[str]]:
    """Each sample's x_T (1, C, H, W) on the device, and its name: seed_S, or the image's index and stem."""
    if files:
        images = model_images(files, unet)
        x_T = ddim_invert(unet, scheduler, images, args.steps, batch_size=args.batch_size, progress=True)
        return [x.unsqueeze(0).to(device) for x in x_T], [f"{i:04d}_{f.stem}" for i, f in enumerate(files)]
    seeds = args.seed or [0]
    return [seed_noise(s, sample_shape(unet)).to(device) for s in seeds], [f"seed_{s}" for s in seeds]


def _report(args, names: list[str], samples: list[EditedSample], gammas: np.ndarray, timestep: int, k: int, distance: str,
            eval_spec, device: str) -> dict:
    """edit.json: settings, per sample and overall; each overall number a mean over samples with its interval."""
    boot = dict(resamples=eval_spec.bootstrap.resamples, level=eval_spec.bootstrap.level, seed=eval_spec.seed)
    dim = int(samples[0].basis.directions[0].numel())
    report = {"model": scrub_text(args.model), "t": args.t, "edit_timestep": timestep, "steps": args.steps,
              "iterations": args.iterations, "gammas": [float(g) for g in gammas], "directions": args.directions,
              "combine": args.combine, "basis_size": k, "distance": f"sqrt({distance})", "device": device,
              "bootstrap": boot, "samples": []}
    per_sample = {name: np.array([np.nanmean([r[name] for r in s.rows]) for s in samples])
                  for name in ("linearity_r2", "straightness")}
    if len(samples) > 1:
        per_sample["consistency"] = agreement_per_sample([s.basis.directions.cpu() for s in samples])
        report["chance_consistency"] = chance_agreement(k, dim)
    for name, values in per_sample.items():
        report[name] = float(np.nanmean(values))
        if len(values) > 1 and np.isfinite(values).all():
            report.update(mean_interval(name, values, **boot))
    for i, (name, sample) in enumerate(zip(names, samples)):
        basis = sample.basis
        report["samples"].append({
            "name": name, "grid": f"grid_{name}.png", "basis": f"basis_{name}.npy",
            "singular_values": basis.singular_values.double().cpu().tolist(),
            "residuals": basis.residuals.double().cpu().tolist(), "rows": sample.rows,
            **({"consistency": float(per_sample["consistency"][i])} if "consistency" in per_sample else {})})
    return report


def _write(out: Path, names: list[str], samples: list[EditedSample], gammas: np.ndarray, report: dict, wall_s: float) -> None:
    """Per sample a grid PNG (rows: directions, columns: gammas) and its basis as .npy (float32, no pickle); edit.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name, sample in zip(names, samples):
        grid = sample.grid
        tiles = to_uint8(grid.reshape(-1, *grid.shape[2:]).numpy())
        save_png(make_grid(tiles, ncols=len(gammas)), out / f"grid_{name}.png")
        np.save(out / f"basis_{name}.npy", sample.basis.directions.float().cpu().numpy(), allow_pickle=False)
    text = json.dumps(_no_nan({**report, "wall_s": round(wall_s, 2)}), indent=2, allow_nan=False)
    (out / REPORT_FILE).write_text(text + "\n")


def _no_nan(value):
    """NaN (a number that is undefined, e.g. R^2 with a single |gamma|) as null: edit.json stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
