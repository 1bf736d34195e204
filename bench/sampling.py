"""Images per second of deterministic DDIM sampling (isosweep.core.sampling.ddim_sample).

    python bench/sampling.py --size 32 --n 32 --steps 20 --batch 32 --threads 1

Uses the built-in shapes UNet architecture (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=32, help="images to sample")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (FID: 20, PPL: 100)")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="batch sizes to compare")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capture-h", action="store_true", help="also capture h at every step (mRTL)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel

    from isosweep.core.sampling import ddim_sample, initial_noise
    from isosweep.models.builtin import builtin_unet_config, default_scheduler

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**builtin_unet_config(args.size)).to(device).eval()
    sched = default_scheduler()
    x = initial_noise(args.n, (3, args.size, args.size), seed=0)
    ddim_sample(unet, sched, x[:2], 2, progress=False, device=device)  # warm-up
    print(f"device={device} threads={torch.get_num_threads()} size={args.size} n={args.n} steps={args.steps} capture_h={args.capture_h}")
    for bs in args.batch:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddim_sample(unet, sched, x, args.steps, batch_size=bs, capture_h=args.capture_h, progress=False, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"batch {bs:>4}: {dt:7.2f} s  {args.n / dt:8.2f} images/s  {args.n * args.steps / dt:8.1f} UNet evals/s")


if __name__ == "__main__":
    main()
