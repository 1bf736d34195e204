"""isosweep's own training loop at the paper's scale: seconds per optimizer step with train.iso_every = 1, 2, 4, ...
against the baseline (docs/benchmarks.md, "Lazy regularisation").

bench/scale.py times the loss's steps in isolation; this runs `isosweep.training.loop.train_loop` itself (data
loader, the per-step coin and lazy rhythm, the finite check, gradient clipping, Adam, EMA) on the
google/ddpm-ema-celebahq-256 UNet built from its config (113.7 M parameters, random weights, saved as a local
diffusers pipeline: nothing is downloaded) and the built-in shapes data at `--resolution`. One run per row, same seed
(the same coins and data); the row's figure is the mean of the loop's own `s_per_step` over the steps after
`--warmup`, and `iso_fraction` says how many of those steps took the isometry term.

    python -m bench.train_steps --device cuda --steps 40 --iso-every 1,2,4          # H200: about 2 min
    python -m bench.train_steps --device cpu --resolution 32 --channels 32 --steps 8  # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.iso_step import build_unet, print_iso_every_table
from isosweep.models.builtin import default_scheduler
from isosweep.spec import spec_from_dict
from isosweep.training.loop import train_loop
from isosweep.training.reporting import LocalReporter


def run(base: Path, out: Path, args: argparse.Namespace, lambda_iso: float, iso_every: int) -> tuple[float, float]:
    """(mean s_per_step, share of steps with the isometry term) over the steps after the warm-up."""
    spec = spec_from_dict({
        "name": "train-steps", "base_model": {"source": str(base)},
        "dataset": {"kind": "shapes", "size": args.batch * args.steps, "resolution": args.resolution},
        "train": {"lambda_iso": lambda_iso, "p": 0.5, "global_batch_size": args.batch, "max_steps": args.steps,
                  "iso_batch": args.iso_batch, "iso_shared_forward": True, "iso_every": iso_every,
                  "mixed_precision": args.mixed_precision, "report_every": 1, "checkpoint_every": 10**6, "seed": 0},
        "resources": {"workers_per_trial": 1, "use_gpu": args.device == "cuda"}}, check_paths=False)
    reporter = LocalReporter(out, device=args.device)
    train_loop(spec, reporter)
    rows = [r for r in reporter.reports if r["step"] > args.warmup]
    return statistics.fmean(r["s_per_step"] for r in rows), statistics.fmean(r["iso_fraction"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the mean")
    parser.add_argument("--batch", type=int, default=8, help="images per step (the paper: 8 per GPU)")
    parser.add_argument("--iso-batch", type=int, default=2, help="train.iso_batch (search_spaces/celebahq.yaml: 2)")
    parser.add_argument("--iso-every", default="1,2,4", help="comma-separated train.iso_every values")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--channels", type=int, default=128, help="first level's channels (128: the real model)")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    every = [int(v) for v in args.iso_every.split(",") if v.strip()]
    torch.manual_seed(0)
    unet = build_unet("celebahq", args.channels, attention=True)
    params = sum(p.numel() for p in unet.parameters())
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    print(f"# isosweep's training loop: {card}; torch {torch.__version__}; celebahq layout, {params:,} parameters, "
          f"{args.resolution} px, batch {args.batch}, iso_batch {args.iso_batch} (shared encoder pass), p = 0.5, "
          f"mixed_precision={args.mixed_precision}; {args.steps} steps per run, mean s_per_step after step {args.warmup}")
    from diffusers import DDPMPipeline

    with tempfile.TemporaryDirectory(prefix="isosweep-train-steps-") as tmp:
        base = Path(tmp) / "base"
        DDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(base)
        del unet
        results = {None: run(base, Path(tmp) / "baseline", args, 0.0, 1)}
        for n in every:
            results[n] = run(base, Path(tmp) / f"every{n}", args, 1e-4, n)
            print(f"#   iso_every={n}: {results[n][0]:.3f} s per step", file=sys.stderr, flush=True)
    base_s = results[None][0]
    print()
    print_iso_every_table(("0%", base_s), [(n, f"{results[n][1]:.0%}", results[n][0]) for n in every],
                          "time per step (the loop's s_per_step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
