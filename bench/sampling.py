"""Images per second per worker of deterministic DDIM sampling (isosweep.core.sampling.ddim_sample).

Two architectures, random weights (speed does not depend on them):
  32 px   the built-in shapes UNet (isosweep.models.builtin, 0.64 M parameters)
  256 px  the google/ddpm-ema-celebahq-256 UNet built from its config (bench/iso_step.build_unet, 113.7 M)
each at a few batch sizes, under torch.inference_mode and torch.no_grad side by side (round-robin, so load
drift hits both alike). A "worker" is one process: on a CPU one torch thread (--threads 1), on a GPU one card.
Images/s is for the DDIM steps given and scales with 1/steps (the UNet forward is the whole cost): the
table also gives UNet evaluations per second (images x steps / s), from which the cost of any protocol
follows. On a CPU the rates use the process's CPU time (this machine's cores are shared with other jobs,
so wall time mostly measures waiting); on a GPU, wall time after torch.cuda.synchronize.

--precision-check also measures how far bf16 autocast moves 32 px samples and a PPL-style finite
difference (eps = 1e-4), against fp32's own float noise (the same decode at another batch size).

    python -m bench.sampling                                  # CPU: 32 px and a small 256 px run, ~3 min CPU time
    python -m bench.sampling --sizes 32 --precision-check --model ~/.cache/isosweep/models/shapes-<hash>
    python -m bench.sampling --device cuda --dtype bf16        # GPU: half-precision UNet forward
    python -m bench.sampling --device cuda --dtype fp32 --tf32 off
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.iso_step import build_unet  # the 256 px architecture: one definition, in bench/iso_step.py
from isosweep.core.sampling import GRAD_MODES, PRECISIONS, DDIMSampler, ddim_sample, initial_noise

# per (device type, size): images, DDIM steps, batch sizes. CPU 256 px: one forward at batch 1 is ~3-4 s.
DEFAULTS: dict[tuple[str, int], tuple[int, int, list[int]]] = {
    ("cpu", 32): (32, 20, [8, 32]),
    ("cpu", 256): (2, 2, [1, 2]),
    ("cuda", 32): (1024, 20, [64, 256, 1024]),
    ("cuda", 256): (64, 20, [8, 16, 32]),
}
# the paper's protocol (search_spaces/celebahq.yaml): (name, images decoded, DDIM steps)
PROTOCOL = [("FID-10k", 10_000, 20), ("PPL-50k (2 decodes per pair)", 100_000, 100)]


def build_model(size: int):
    """(UNet, scheduler, label) of the benchmark architecture at `size` px, random weights."""
    from diffusers import UNet2DModel

    from isosweep.models.builtin import builtin_unet_config, default_scheduler

    torch.manual_seed(0)
    if size == 32:
        return UNet2DModel(**builtin_unet_config(32)), default_scheduler(), "built-in shapes UNet"
    if size == 256:
        return build_unet("celebahq", 128, attention=True), default_scheduler(), "ddpm-ema-celebahq-256 UNet"
    raise SystemExit(f"--sizes: 32 or 256, got {size}")


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off (the suite's full_float32_matmul is off)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall s, CPU s of this process) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def throughput(size: int, args, device: torch.device) -> list[dict]:
    """Rows of the table for one size: every batch size x grad mode, `args.repeats` timed rounds each."""
    n, steps, batches = DEFAULTS[(device.type, size)]
    n, steps, batches = args.n or n, args.steps or steps, args.batch or batches
    unet, sched, label = build_model(size)
    unet = unet.to(device).eval()
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    x = initial_noise(n, (3, size, size), seed=0)

    def run(bs: int, mode: str) -> Callable[[], object]:
        return lambda: ddim_sample(unet, sched, x, steps, batch_size=bs, capture_h=args.capture_h, progress=False,
                                   device=device, precision=args.dtype, grad_mode=mode)

    ddim_sample(unet, sched, x[: min(batches)], 1, batch_size=min(batches), progress=False, device=device,
                precision=args.dtype)  # warm-up: kernels, allocator
    times: dict[tuple[int, str], list[tuple[float, float]]] = {(bs, m): [] for bs in batches for m in args.modes}
    for _ in range(args.repeats):
        for key, ts in times.items():  # round-robin
            ts.append(timed(run(*key), device))
    rows = []
    for (bs, mode), ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        basis = cpu if device.type == "cpu" else wall
        rows.append({"size": size, "label": label, "params": params, "batch": bs, "mode": mode, "n": n, "steps": steps,
                     "wall": wall, "cpu": cpu, "ips": n / basis, "evals": n * steps / basis})
    return rows


def print_table(rows: list[dict], device: torch.device) -> None:
    on_cpu = device.type == "cpu"
    print(f"| size | UNet | batch | grad mode | images x DDIM steps | wall s | {'CPU s' if on_cpu else '-'} | "
          f"images/s | UNet evals/s | vs no_grad |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["size"], r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["size"], r["batch"], "no_grad"))
        speed = f"{r['evals'] / ref['evals']:.2f}x" if ref is not None and r["mode"] != "no_grad" else ""
        cpu = f"{r['cpu']:.1f}" if on_cpu else "-"
        print(f"| {r['size']} px | {r['label']}, {r['params']:.2f} M | {r['batch']} | {r['mode']} | {r['n']} x {r['steps']} | "
              f"{r['wall']:.1f} | {cpu} | {r['ips']:.3g} | {r['evals']:.3g} | {speed} |")


def print_protocol(rows: list[dict]) -> None:
    """Hours per worker of the paper's FID-10k and PPL-50k at the best inference_mode rate of each size."""
    print()
    print("| size | best UNet evals/s (inference_mode) | " + " | ".join(f"{name}: {k:,} x {s} steps" for name, k, s in PROTOCOL) + " |")
    print("|---|---|" + "---|" * len(PROTOCOL))
    for size in sorted({r["size"] for r in rows}):
        best = max((r for r in rows if r["size"] == size and r["mode"] == "inference"), key=lambda r: r["evals"], default=None)
        if best is None:
            continue
        cells = " | ".join(f"{k * s / best['evals'] / 3600:,.1f} h" for _, k, s in PROTOCOL)
        print(f"| {size} px | {best['evals']:.3g} (batch {best['batch']}) | {cells} |")


def precision_check(args, device: torch.device) -> None:
    """How far bf16 autocast moves 32 px samples and PPL finite differences, next to fp32's own noise."""
    from diffusers import DDPMScheduler, UNet2DModel

    from isosweep.evaluation.metrics.ppl import ppl_distances
    from isosweep.evaluation.metrics.samples import SampleRange

    if args.model:
        unet = UNet2DModel.from_pretrained(Path(args.model).expanduser() / "unet")
        sched = DDPMScheduler.from_pretrained(Path(args.model).expanduser() / "scheduler")
        label = f"trained model {args.model}"
    else:
        unet, sched, label = build_model(32)
        label += " (random weights: pass --model for a trained one)"
    unet = unet.to(device).eval()
    size = unet.config.sample_size
    half = "bf16" if device.type == "cpu" or args.dtype == "fp32" else args.dtype
    n, steps, eps = 8, 20, 1e-4
    x = initial_noise(n, (3, size, size), seed=0)
    ref = ddim_sample(unet, sched, x, steps, batch_size=n, progress=False, device=device).images
    fp32_rebatched = ddim_sample(unet, sched, x, steps, batch_size=1, progress=False, device=device).images
    low = ddim_sample(unet, sched, x, steps, batch_size=n, progress=False, device=device, precision=half).images

    def moved(a: torch.Tensor) -> str:
        d = a - ref
        return f"max {d.abs().max():.2e}, rms {d.pow(2).mean().sqrt():.2e}"

    print()
    print(f"Precision check: {label}, {n} images x {steps} DDIM steps, pixels in [-1, 1] "
          f"(image rms {ref.pow(2).mean().sqrt():.2f}); {half} = autocast of the UNet forward, DDIM update in fp32")
    print()
    print("| what | fp32, batch 1 instead of 8 (float noise) | " + half + " |")
    print("|---|---|---|")
    print(f"| samples moved by | {moved(fp32_rebatched)} | {moved(low)} |")

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pixel distance; PPL uses LPIPS, same scaling by 1/eps^2
        return (a - b).pow(2).flatten(1).mean(1)

    pairs = 4
    ppl = {}
    for name, bs, prec in (("fp32", 2 * pairs, "fp32"), ("fp32_rebatched", 1, "fp32"), (half, 2 * pairs, half)):
        sampler = DDIMSampler(unet, sched, batch_size=bs, progress=False, device=device, precision=prec)
        samples = SampleRange(sampler=sampler, shape=(3, size, size), seed=0, ddim_steps=steps, total=pairs, batch_size=pairs)
        ppl[name] = torch.from_numpy(ppl_distances(samples, mse, eps=eps))
    rel = {k: ((v - ppl["fp32"]).abs() / ppl["fp32"]).median().item() for k, v in ppl.items() if k != "fp32"}
    print(f"| PPL finite difference (pixel MSE / eps^2, eps = {eps:g}, {pairs} pairs): median relative change | "
          f"{rel['fp32_rebatched']:.2e} | {rel[half]:.2e} |")
    print(f"\nfp32 per-pair values: {', '.join(f'{v:.4g}' for v in ppl['fp32'])}; "
          f"{half}: {', '.join(f'{v:.4g}' for v in ppl[half])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 256], choices=[32, 256])
    p.add_argument("--n", type=int, default=None, help="images per configuration (default per size and device: DEFAULTS)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default per size and device; FID: 20, PPL: 100)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes to compare (default per size and device)")
    p.add_argument("--modes", nargs="+", default=list(GRAD_MODES), choices=GRAD_MODES, help="grad modes to compare")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds per configuration (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(PRECISIONS), help="precision of the UNet forward (autocast)")
    p.add_argument("--tf32", choices=("off", "on"), default="off", help="TF32 on a GPU (evaluation runs with it off)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice); 1 = one worker per core")
    p.add_argument("--capture-h", action="store_true", help="also capture h at every step (mRTL)")
    p.add_argument("--precision-check", action="store_true", help="measure how far bf16 moves 32 px samples and PPL")
    p.add_argument("--model", default=None, help="diffusers pipeline directory for --precision-check (32 px)")
    p.add_argument("--skip-throughput", action="store_true", help="only the precision check")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        p.error("--device: cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if device.type == "cpu" and args.dtype == "fp16":
        p.error("--dtype fp16 needs --device cuda (ddim_sample refuses fp16 on a CPU)")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    import diffusers

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                 f"{os.cpu_count()} cores visible")
    print(f"# DDIM sampling throughput: {name}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"Python {platform.python_version()}")
    tf32_note = f", TF32 {args.tf32}" if device.type == "cuda" else ""
    print(f"# dtype {args.dtype}{tf32_note}, capture_h={args.capture_h}, repeats {args.repeats}; "
          f"rates from {'CPU' if device.type == 'cpu' else 'wall'} time")
    if device.type == "cpu" and args.dtype == "bf16":
        print("# note: bf16 on a CPU without native bf16 units is emulated and much slower than fp32")
    print()
    with tf32(args.tf32 == "on"):
        if not args.skip_throughput:
            rows = [r for size in args.sizes for r in throughput(size, args, device)]
            print_table(rows, device)
            print_protocol(rows)
        if args.precision_check:
            precision_check(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
