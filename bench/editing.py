"""What Local Basis editing (`isosweep edit`) costs: the directions at one x_t, by subspace iteration, per sample.

    python -m bench.editing                                   # the built-in shapes model (32 px)
    python -m bench.editing --random-unet 256 --iterations 2  # google/ddpm-ema-celebahq-256's architecture, random weights
    python -m bench.editing --random-unet 256 --device cuda

Prints the seconds and peak memory of `core.editing.unet_local_basis` for k directions (k + 4 vectors, run through
the encoder --vectors-per-pass at a time) against the rounds of subspace iteration, and the worst residual ||J^T J v - sigma^2 v|| / sigma^2 (for a random UNet the
residuals say nothing about a trained one). No timed assertions: numbers go to docs/editing.md with this command.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.ppl_jvp import header, random_unet, spec_model
from isosweep.core.editing import unet_local_basis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="search_spaces/demo.yaml", help="its base model, unless --random-unet")
    p.add_argument("--random-unet", type=int, default=None, metavar="R")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--iterations", type=int, nargs="+", default=[2, 8])
    p.add_argument("--t", type=int, default=500)
    p.add_argument("--vectors-per-pass", type=int, default=None, help="copies of x_t through the encoder at once (default: all k + 4)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    header(args, device, "bench.editing")
    unet = random_unet(args.random_unet)[0] if args.random_unet else spec_model(args.spec)[1]
    unet = unet.to(device).eval()
    c, r = unet.config.in_channels, unet.config.sample_size
    x_t = torch.randn(1, c, r, r, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"# {r} px, k = {args.k}, t = {args.t}")
    print(f"# vectors per pass: {args.vectors_per_pass or args.k + 4}")
    print("| rounds | seconds | worst residual | peak memory GiB |\n|---|---|---|---|")
    for rounds in args.iterations:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        basis = unet_local_basis(unet, x_t, args.t, args.k, iterations=rounds, vectors_per_pass=args.vectors_per_pass)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"| {rounds} | {time.perf_counter() - t0:.2f} | {float(basis.residuals.max()):.2e} | {_peak_gib(device):.1f} |")
    return 0


def _peak_gib(device: torch.device) -> float:
    """Peak memory so far: the device's allocator on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
