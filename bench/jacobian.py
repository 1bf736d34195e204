"""Batched encoder Jacobian vs torch.autograd.functional.jacobian's loop: same singular values, speed ratio.

    python -m bench.jacobian --size 16 --batch 2 --threads 1
    python -m bench.jacobian --size 32 --batch 1 --methods vjp batched --device cuda

The encoder is the built-in shapes UNet (isosweep.models.builtin_unet_config) up to its mid block, at
t = 999, h average-pooled with kernel 2 (docs/math.md section 5). The loop is the reference the paper's
appendix timed; each batched method builds all B Jacobians at once.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="image side in pixels (n = 3*size^2 inputs)")
    p.add_argument("--batch", type=int, default=2, help="samples whose Jacobians are built")
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--chunk", type=int, default=None, help="rows/columns per vectorised pass (default: memory budget)")
    p.add_argument("--budget-mb", type=float, default=2048)
    p.add_argument("--methods", nargs="+", default=["vjp", "batched", "jvp"], help="batched methods to time")
    p.add_argument("--no-loop", action="store_true", help="skip the (slow) reference loop")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel

    from isosweep.evaluation.metrics.jacobian import (
        autodiff_context,
        batched_jacobian,
        choose_method,
        looped_jacobian,
        pooled_encoder,
        unet_encoder,
    )
    from isosweep.models.builtin import builtin_unet_config

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**builtin_unet_config(args.size)).to(device).eval()
    fn = pooled_encoder(unet_encoder(unet, 999), args.pool)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.no_grad():
        m = fn(x[:1]).shape[1]
    n = x[0].numel()
    print(f"device={device} threads={torch.get_num_threads()} size={args.size} batch={args.batch} "
          f"outputs m'={m} inputs n={n} auto={choose_method(n, m, device)}")

    def timed(f):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    with autodiff_context(unet):
        ref = None
        if not args.no_loop:
            ref, t_loop = timed(lambda: looped_jacobian(fn, x))
            print(f"{'loop':>8}: {t_loop:8.2f} s  ({t_loop / args.batch:.2f} s per Jacobian)")
        for method in args.methods:
            J, t = timed(lambda: batched_jacobian(fn, x, method=method, chunk_size=args.chunk, memory_budget_mb=args.budget_mb))
            line = f"{method:>8}: {t:8.2f} s  ({t / args.batch:.2f} s per Jacobian)"
            if ref is not None:
                s_ref = torch.linalg.svdvals(ref.double())
                s = torch.linalg.svdvals(J.double())
                err = ((s - s_ref).abs().max() / s_ref.max()).item()
                line += f"  speed-up x{t_loop / t:.2f}  max |dsigma|/sigma_max={err:.1e}"
            print(line)


if __name__ == "__main__":
    main()
