"""PPL by forward-mode differentiation (`evaluation.ppl.method: jvp`) against the finite difference: agreement and cost.

    python -m bench.ppl_jvp converge                  # per pair, float64 model: FD at eps 1e-1 .. 1e-7 against the JVP value
    python -m bench.ppl_jvp agree --pairs 300         # PPL with its interval: FD fp32 (today) against JVP fp32 / bf16
    python -m bench.ppl_jvp cost --resolution 32      # time per pair and DDIM step, and the PPL-50k bill it implies
    python -m bench.ppl_jvp cost --resolution 256 --device cuda --pairs 16
    python -m bench.ppl_jvp agree --random-unet 256 --device cuda --pairs 64 --steps 10 --distance lpips

Models: `converge` and `agree` use the spec's base model (default search_spaces/demo.yaml: the built-in shapes DDPM,
pretrained and cached on first use) or, with --random-unet R, a randomly initialised UNet of google/ddpm-ema-celebahq-256's
architecture at R px (R = 256: the real size; for timing and for the agreement of the arithmetic, not for PPL values
of a trained model). Distances: `domain` (the built-in problem's network, what its sweeps measure PPL with) and `lpips`
(the lpips package's LPIPS v0.1 linear layers over an AlexNet with random weights, the stand-in for the published
AlexNet file, which cannot be fetched here). No timed assertions: numbers go to docs/metrics.md with this command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from isosweep.core.sampling import DDIMSampler, ddim_sample, ddim_tangent
from isosweep.evaluation.metrics.confidence import ppl_summary
from isosweep.evaluation.metrics.paths import slerp, slerp_tangent
from isosweep.evaluation.metrics.ppl import ppl_distances, ppl_pairs, tangent_quadratic
from isosweep.evaluation.metrics.samples import SampleRange

PPL_PAIRS_PAPER, PPL_STEPS_PAPER = 50_000, 100


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores visible)"


def header(args: argparse.Namespace, device: torch.device, module: str = "bench.ppl_jvp") -> None:
    import diffusers

    print(f"# {machine(device)}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# $ python -m {module} " + " ".join(sys.argv[1:]))


def random_unet(resolution: int):
    """google/ddpm-ema-celebahq-256's UNet architecture (bench/iso_step.py's layout) at `resolution`, random weights."""
    from diffusers import DDPMScheduler

    from bench.iso_step import build_unet

    torch.manual_seed(0)
    unet = build_unet("celebahq", 128, attention=True)
    unet.register_to_config(sample_size=resolution)
    return unet.eval(), DDPMScheduler(num_train_timesteps=1000)


def spec_model(spec_path: str):
    from isosweep.models.loading import load_unet_and_scheduler
    from isosweep.spec import load_spec

    spec = load_spec(spec_path, [])
    unet, scheduler = load_unet_and_scheduler(spec.base_model, spec.dataset, progress=True)
    return spec, unet.eval(), scheduler


def distance(name: str, resolution: int, spec=None, device: torch.device | str = "cpu"):
    """(callable, label): the domain network of the built-in problem, or LPIPS over a random-weight AlexNet."""
    if name == "domain":
        from isosweep.evaluation.features import resolver

        nets = resolver.load_feature_networks(spec.evaluation, spec.dataset, needs=("ppl",), device=device, progress=True)
        return nets.distance, nets.names["ppl"]
    import lpips

    torch.manual_seed(1)
    model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval().to(device)

    @torch.no_grad()
    def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model(a.to(device, dtype), b.to(device, dtype)).reshape(-1).cpu()

    lpips_distance.model = model  # type: ignore[attr-defined]
    return lpips_distance, f"lpips-v0.1 over a random AlexNet, at {resolution} px"


def _model(args):
    if args.random_unet:
        return None, *random_unet(args.random_unet)
    return spec_model(args.spec)


def converge(args: argparse.Namespace) -> int:
    """Per pair, in float64 (model, latents, distance): |FD(eps) / JVP - 1| as eps shrinks."""
    device = torch.device("cpu")
    header(args, device)
    spec, unet, scheduler = _model(args)
    unet = unet.double()
    res = unet.config.sample_size
    shape = (unet.config.in_channels, res, res)
    z0, z1, s = ppl_pairs(args.pairs, shape, args.seed)
    z0, z1 = z0.double(), z1.double()
    epsilons = [10.0 ** -k for k in range(1, 8)]
    print(f"# {args.pairs} pairs, {args.steps} DDIM steps; model, latents and distance in float64, images float32 as the "
          "sampler returns them (the finite difference's floor: float32 rounding of two images eps apart)")
    for name in args.distance:
        dist, label = distance(name, res, spec)
        if name == "lpips":
            dist.model.double()
        else:
            dist.net.double()
        x = slerp(z0, z1, s)
        images, tangents = ddim_tangent(unet, scheduler, x, slerp_tangent(z0, z1, s), args.steps)
        # the finite difference's base image, decoded as PPL decodes it (float32 images)
        base = ddim_sample(unet, scheduler, x, args.steps, progress=False, batch_size=64).images
        jvp = tangent_quadratic(dist, images.double(), tangents.double()).double()
        print(f"\n## {label}: |FD(eps) / JVP - 1| over the pairs (JVP values: median {jvp.median():.4g})")
        print("| eps | median | max |")
        print("|---|---|---|")
        for eps in epsilons:
            moved = ddim_sample(unet, scheduler, slerp(z0, z1, s + eps), args.steps, progress=False, batch_size=64).images
            fd = dist(base.double(), moved.double()).double() / eps**2
            err = (fd / jvp - 1).abs()
            print(f"| {eps:.0e} | {err.median():.2e} | {err.max():.2e} |")
    return 0


def agree(args: argparse.Namespace) -> int:
    """PPL with its bootstrap interval: FD fp32 at eps 1e-4 (today's) against JVP in each precision, same pairs."""
    device = torch.device(args.device)
    header(args, device)
    spec, unet, scheduler = _model(args)
    unet = unet.to(device)
    res = unet.config.sample_size
    sampler = DDIMSampler(unet, scheduler, batch_size=args.batch, progress=False, device=device)
    print(f"# {args.pairs} pairs, {args.steps} DDIM steps, batches of {args.batch} pairs; bootstrap 2000 resamples, 95 %")
    from isosweep.evaluation.suite import full_float32_matmul

    for name in args.distance:
        dist, label = distance(name, res, spec, device)
        samples = SampleRange(sampler=sampler, shape=sampler.sample_shape, seed=args.seed, ddim_steps=args.steps,
                              total=args.pairs, batch_size=args.batch)
        print(f"\n## {label}")
        print("| method | precision | PPL (filtered mean) | 95 % interval | median pair |FD-relative| | time |")
        print("|---|---|---|---|---|---|")
        reference = None
        for method, precision in [("finite_difference", "fp32"), *(("jvp", p) for p in args.precisions)]:
            t0 = time.perf_counter()
            with full_float32_matmul():
                d = ppl_distances(samples, dist, eps=1e-4, method=method, precision=precision)
            took = time.perf_counter() - t0
            summary = ppl_summary(d, resamples=2000, level=0.95, seed=0)
            reference = d if reference is None else reference
            rel = float(np.median(np.abs(d / reference - 1)))
            print(f"| {method} | {precision} | {summary['ppl']:.5g} | [{summary['ppl_lo']:.5g}, {summary['ppl_hi']:.5g}] "
                  f"| {rel:.2e} | {took:.1f} s |")
    return 0


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def cost(args: argparse.Namespace) -> int:
    """Seconds per pair and DDIM step: FD fp32 (two decodes, TF32 off) against JVP (one decode carrying a tangent)."""
    device = torch.device(args.device)
    header(args, device)
    if args.resolution == 32:
        from diffusers import DDPMScheduler, UNet2DModel

        from isosweep.models.builtin import builtin_unet_config

        torch.manual_seed(0)
        unet, scheduler, what = UNet2DModel(**builtin_unet_config(32)).eval(), DDPMScheduler(), "built-in shapes UNet, 32 px"
    else:
        unet, scheduler = random_unet(args.resolution)
        what = f"google/ddpm-ema-celebahq-256 architecture at {args.resolution} px"
    unet = unet.to(device)
    n_params = sum(p.numel() for p in unet.parameters())
    shape = (unet.config.in_channels, args.resolution, args.resolution)
    z0, z1, s = ppl_pairs(args.pairs, shape, args.seed)
    x, v = slerp(z0, z1, s), slerp_tangent(z0, z1, s)
    xx = torch.cat([x, slerp(z0, z1, s + 1e-4)])
    print(f"# {what}, {n_params:,} parameters, random weights; {args.pairs} pairs per batch, {args.steps} DDIM steps "
          f"timed, median of {args.repeats}")
    from isosweep.evaluation.suite import full_float32_matmul

    variants = {"finite_difference fp32": lambda: ddim_sample(unet, scheduler, xx, args.steps, batch_size=2 * args.pairs,
                                                              progress=False, device=device)}
    for precision in args.precisions:
        variants[f"jvp {precision}"] = (lambda p: lambda: ddim_tangent(unet, scheduler, x, v, args.steps,
                                                                       batch_size=args.pairs, device=device, precision=p))(precision)
    print("| variant | ms per pair and DDIM step | x finite difference | PPL-50k at 100 steps | peak memory |")
    print("|---|---|---|---|---|")
    base = None
    for name, fn in variants.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with full_float32_matmul():
                sec = _timed(fn, device, args.repeats) / (args.pairs * args.steps)
        except Exception as exc:  # one variant's failure (an op without a forward-mode rule, memory) must not hide the rest
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | | |")
            continue
        base = sec if base is None else base
        bill_h = sec * PPL_PAIRS_PAPER * PPL_STEPS_PAPER / 3600
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        print(f"| {name} | {1e3 * sec:.3f} | {sec / base:.2f} | {bill_h:.2f} h | {mem} |")
    if args.profile:
        profile(variants[f"jvp {args.profile}"], variants["finite_difference fp32"], device)
    return 0


def profile(jvp, fd, device: torch.device) -> None:
    """Where the time of one JVP decode goes, next to one finite-difference decode: the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    from isosweep.evaluation.suite import full_float32_matmul

    for label, fn in (("jvp", jvp), ("finite_difference fp32", fd)):
        with full_float32_matmul(), torch_profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n## profile: {label} (one decode)")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("converge", "agree", "cost"):
        q = sub.add_parser(name)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu")
        q.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
        if name == "cost":
            q.add_argument("--resolution", type=int, default=32, choices=[32, 64, 128, 256])
            q.add_argument("--pairs", type=int, default=8, help="pairs per batch")
            q.add_argument("--steps", type=int, default=3, help="DDIM steps per timed decode")
            q.add_argument("--repeats", type=int, default=3)
            q.add_argument("--profile", choices=["fp32", "tf32", "bf16"], default=None,
                           help="also profile one JVP decode in this precision and one finite-difference decode")
        else:
            q.add_argument("--spec", default="search_spaces/demo.yaml")
            q.add_argument("--random-unet", type=int, default=None, metavar="R",
                           help="a random-weight UNet of the CelebA-HQ architecture at R px instead of the spec's model")
            q.add_argument("--distance", nargs="+", default=["domain", "lpips"], choices=["domain", "lpips"])
            q.add_argument("--pairs", type=int, default=8 if name == "converge" else 300)
            q.add_argument("--steps", type=int, default=20)
            q.add_argument("--batch", type=int, default=32, help="pairs per decode batch")
    args = p.parse_args(argv)
    if args.device == "cpu":
        args.precisions = [q for q in args.precisions if q != "tf32"]  # TF32 is a CUDA setting: on a CPU it is fp32
    return {"converge": converge, "agree": agree, "cost": cost}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
