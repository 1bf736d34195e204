"""The training step at the paper's scale: the google/ddpm-ema-celebahq-256 UNet, 256 px.

Builds the real architecture from its config (bench/iso_step.py's `build_unet(layout="celebahq", channels=128)`,
113.7 M parameters, random weights: nothing is downloaded) and times whole optimizer steps (forward, backward,
Adam) on one fixed batch of `--batch` images, each variant in the same run, round-robin:

  plain       the denoising (epsilon MSE) step, t ~ U[0, T), fast attention kernels
  iso         isosweep's loss (`core.losses.IsoDiffusionLoss`, per_timestep, the step with the isometry term
              on) without the cost levers: the isometry term on every sample, its own encoder pass
  iso+levers  the same loss with `--iso-batch` (the isometry term on the first k samples) and, unless
              `--no-share`, the encoder pass shared between the JVP and the denoising term (train.iso_batch,
              train.iso_shared_forward)
  iso_sub     (not run by default) iso_batch alone, without the shared encoder pass: what sharing adds
  reference   denoising + the public recipe's isometry term on every sample (bench/iso_step.py's
              `reference_isometry_loss`: full UNet, stereographic chart, 2 double-backward JVPs + 1 VJP)

On a CPU the ratios use the process's CPU time (the machine is shared; wall time mostly measures waiting) and
memory is the peak RSS above the level before each step; on CUDA, wall time and torch's peak allocation.
`--bf16` (CUDA) runs the denoising forward under bf16 autocast (the isometry term stays float32, as in training).
Targets: iso+levers <= 2.0x plain in time and in peak memory, <= 0.40x reference.

`--estimator` instead measures what the sub-batch costs in accuracy, on bench/iso_step.py's small UNet (32 px):
over `--draws` micro-batches (fresh x0, noise, t_iso, probes) it takes L_iso on the first k samples for each k
and reports its mean, spread and bias against the whole micro-batch, and the error of its gradient against
the mean whole-batch gradient.

`--profile VARIANT` (CUDA) runs torch.profiler over one step of that variant after the warm-up and prints where
the time goes: the GPU's busy time against the wall time (a step whose kernels keep the GPU busy a small part of
its wall time is bound by launches and the CPU, not by arithmetic), the kernel launch count, and the ops that take
the most GPU and CPU time. `--cudnn-benchmark` lets cuDNN pick its convolution algorithms by timing them.

    python -m bench.scale --batch 2 --iso-batch 1 --warmup 0 --repeats 1  # 256 px, CPU: 10 min of CPU time, 17 GiB
    python -m bench.scale --device cuda --batch 8 --iso-batch 2 --bf16 --repeats 5
    python -m bench.scale --estimator                                   # small UNet: about a minute
    python -m bench.scale --device cuda --batch 8 --iso-batch 2 --profile iso_levers
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import diffusers
import torch
import torch.nn.functional as F

from bench.iso_step import LAMBDA_ISO, P_SPLIT, Stepper, T, build_unet, measure, print_iso_every_table, reference_isometry_loss
from isosweep.core.geometry import isometry_ratio, isometry_terms
from isosweep.core.hspace import encoder_at
from isosweep.core.losses import IsoDiffusionLoss, add_noise, iso_cutoff

CELEBAHQ_PARAMS = 113_673_219  # google/ddpm-ema-celebahq-256's config built by diffusers 0.42
TARGET_VS_PLAIN, TARGET_VS_REFERENCE = 2.0, 0.40


class ScaleStepper(Stepper):
    """bench/iso_step.py's Stepper (model, Adam, schedule, one batch) with isosweep's training loss as a step."""

    def __init__(self, unet, x0: torch.Tensor, *, iso_batch: int | None, share: bool, amp: torch.dtype | None, seed: int = 0):
        super().__init__(unet, x0, seed=seed)
        self.amp = amp
        self.shared = torch.Generator().manual_seed(seed + 1)  # the per-step generator every rank shares (t_iso)
        self.local = torch.Generator().manual_seed(seed + 2)
        common = {"lambda_iso": LAMBDA_ISO, "p": P_SPLIT, "timesteps": T, "iso_timesteps": "per_timestep"}
        self.loss_all = IsoDiffusionLoss(**common)
        self.loss_levers = IsoDiffusionLoss(**common, iso_batch=iso_batch, share_forward=share)
        self.loss_sub = IsoDiffusionLoss(**common, iso_batch=iso_batch)
        self.common, self.iso_batch, self.share = common, iso_batch, share
        # Adam's state (2 x 113.7 M floats, 0.9 GB) now, so the first variant's peak memory does not carry it:
        # a step on zero gradients allocates it and leaves the weights as they are
        for p in unet.parameters():
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _autocast(self):
        return torch.autocast(self.x0.device.type, dtype=self.amp, enabled=self.amp is not None)

    def plain(self) -> None:
        x_t, t, eps = self._noisy(0, T)
        with self._autocast():
            loss = F.mse_loss(self.unet(x_t, t).sample.float(), eps)
        self._update(loss)

    def _iso(self, loss_fn: IsoDiffusionLoss) -> None:
        d = loss_fn.draw(self.x0, True, self.local, self.shared)
        with self._autocast():
            out = loss_fn(self.unet, self.unet, self.x0, d.t, d.noise, True, self.abar, generator=self.local, t_iso=d.t_iso)
        self._update(out.loss)

    def iso(self) -> None:
        self._iso(self.loss_all)

    def iso_levers(self) -> None:
        self._iso(self.loss_levers)

    def iso_sub(self) -> None:
        self._iso(self.loss_sub)

    def trial(self, every: int | None, steps: int) -> int:
        """`steps` optimizer steps as training takes them with train.iso_every = `every` (None: the baseline, a plain
        step each): each step's coin from its own seeded generator (the same coins for every `every`), the isometry
        term where the coin is on and the step is due. Returns how many steps took the term."""
        loss_fn = (IsoDiffusionLoss(**self.common, iso_batch=self.iso_batch, share_forward=self.share, iso_every=every)
                   if every is not None else IsoDiffusionLoss(**(self.common | {"lambda_iso": 0.0})))
        taken = 0
        for step in range(steps):
            shared = torch.Generator().manual_seed(10_000 + step)  # the loop's per-step generator, shared by every rank
            on, due = loss_fn.coin(shared), loss_fn.due(step)
            d = loss_fn.draw(self.x0, on, self.local, shared, term=due)
            with self._autocast():
                out = loss_fn(self.unet, self.unet, self.x0, d.t, d.noise, d.iso_on and due, self.abar, generator=self.local,
                              t_iso=d.t_iso)
            self._update(out.loss)
            taken += int(out.iso_on)
        return taken

    def reference(self) -> None:
        x_t, t, eps = self._noisy(iso_cutoff(P_SPLIT, T), T)
        with self._autocast():
            dsm = F.mse_loss(self.unet(x_t, t).sample.float(), eps)
        self._update(dsm + LAMBDA_ISO * reference_isometry_loss(self.unet, x_t, t, self.gen))


def _logged(name: str, step):
    """The step, printing its CPU time as it ends (a long run shows progress, and a killed one leaves its figures)."""

    def run() -> None:
        cpu0 = time.process_time()
        step()
        print(f"#   {name}: {time.process_time() - cpu0:.1f} s CPU", file=sys.stderr, flush=True)

    return run


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.machine()}, {platform.processor() or 'unknown model'}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores visible)"


def run_scale(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.bf16 else None
    if amp is not None and device.type != "cuda":
        raise SystemExit("--bf16 is for --device cuda (autocast on the CPU is slower here and not what training does)")
    torch.manual_seed(args.seed)
    unet = build_unet("celebahq", args.channels, attention=True).to(device).train()
    n_params = sum(p.numel() for p in unet.parameters())
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    x0 = (torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    k = args.iso_batch if args.iso_batch is not None else args.batch
    stepper = ScaleStepper(unet, x0, iso_batch=args.iso_batch, share=not args.no_share, amp=amp, seed=args.seed)
    levers = f"iso_batch={k}" + ("" if args.no_share else ", shared encoder pass")
    labels = {
        "plain": "plain denoising step",
        "iso": f"isosweep, no levers (isometry term on all {args.batch})",
        "iso_levers": f"isosweep + levers ({levers})",
        "iso_sub": f"isosweep, iso_batch={k} only (own encoder pass)",
        "reference": f"reference-style (full UNet, 2 double-backward JVPs + 1 VJP, on all {args.batch})",
    }
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(labels))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(labels)}")

    print(f"# scale benchmark: {_machine(device)}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"Python {platform.python_version()}")
    check = "the 113.7 M of google/ddpm-ema-celebahq-256" if n_params == CELEBAHQ_PARAMS else f"!= the real model's {CELEBAHQ_PARAMS}"
    print(f"# UNet: celebahq layout, channels={args.channels}, {n_params:,} parameters ({check}), random weights; "
          f"resolution={args.resolution} batch={args.batch} iso_batch={k} share={not args.no_share} "
          f"channels_last={args.channels_last} bf16={args.bf16} cudnn_benchmark={args.cudnn_benchmark} warmup={args.warmup} repeats={args.repeats} "
          f"p={P_SPLIT} lambda_iso={LAMBDA_ISO}")
    sys.stdout.flush()
    if args.profile:
        if args.profile not in labels:
            raise SystemExit(f"--profile: unknown variant {args.profile!r}; choose from {sorted(labels)}")
        return profile_step(getattr(stepper, args.profile), labels[args.profile], device, args.warmup)
    results = measure({name: _logged(name, getattr(stepper, name)) for name in wanted}, device, args.warmup, args.repeats)

    on_cpu = device.type == "cpu"
    basis = 1 if on_cpu else 0
    mem_kind = "peak RSS increase" if on_cpu else "peak GPU memory allocated"
    have = lambda name: name in results

    def rel(name: str, den: str, i: int) -> str:
        return f"{results[name][i] / results[den][i]:.2f}x" if have(den) else "-"

    print()
    print(f"| step | median wall | median CPU time | {mem_kind} | time vs plain | memory vs plain | time vs reference |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall, cpu, mib, exact) in results.items():
        cpu_text = f"{cpu:.1f} s" if on_cpu else "-"
        approx = "" if exact else " (process peak)"
        print(f"| {labels[name]} | {wall:.{1 if on_cpu else 3}f} s | {cpu_text} | {mib / 1024:.2f} GiB{approx} | {rel(name, 'plain', basis)} | "
              f"{rel(name, 'plain', 2)} | {rel(name, 'reference', basis)} |")
    print()
    print(f"Targets (ratios of median {'CPU' if on_cpu else 'wall'} time and of peak memory):")
    print()
    print("| step | time <= 2.0x plain | memory <= 2.0x plain | time <= 0.40x reference |")
    print("|---|---|---|---|")
    for name in ("iso", "iso_sub", "iso_levers"):
        if not have(name):
            continue
        cells = []
        for den, i, target in (("plain", basis, TARGET_VS_PLAIN), ("plain", 2, TARGET_VS_PLAIN), ("reference", basis, TARGET_VS_REFERENCE)):
            if have(den):
                value = results[name][i] / results[den][i]
                cells.append(f"{value:.2f}: {'met' if value <= target else 'MISSED'}")
            else:
                cells.append("-")
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    if have("plain") and have("iso_levers") and args.iso_every:
        print_lazy(results, basis, args.iso_every, have("reference"))
    if args.trial_steps and args.iso_every:
        time_trials(stepper, device, args.iso_every, args.trial_steps, on_cpu)
    if have("iso") and have("iso_levers"):
        print()
        print(f"Levers: time x{results['iso'][basis] / results['iso_levers'][basis]:.2f} faster, "
              f"memory x{results['iso'][2] / results['iso_levers'][2]:.2f} smaller than the same loss without them.")
    return 0


def print_lazy(results: dict, basis: int, every: list[int], with_reference: bool) -> None:
    """What a trial pays per optimizer step with lazy regularisation (train.iso_every = n), derived from the medians
    above: the isometry term is on a step when its coin is (probability 1 - p) and the step is due (1 in n); every
    other step costs a plain step (its timesteps come from either range, which costs the same)."""
    plain, levers = results["plain"][basis], results["iso_levers"][basis]
    ref = results["reference"][basis] if with_reference else None
    print()
    print(f"Per optimizer step of a trial at p = {P_SPLIT} (derived from the medians above, not timed: a fraction "
          f"(1 - p) / n of the steps takes the isometry step, the rest a plain one; the reference-style trial takes its "
          f"term on every step of the iso range; peak memory is the isometry step's, whatever n):")
    print()
    print("| train.iso_every (n) | steps with the isometry term | time vs a plain trial | time vs a reference-style trial |")
    print("|---|---|---|---|")
    for n in every:
        share = (1 - P_SPLIT) / n
        cost = plain + share * (levers - plain)
        vs_ref = f"{cost / (plain + (1 - P_SPLIT) * (ref - plain)):.2f}x" if ref is not None else "-"
        print(f"| {n} | {share:.1%} | {cost / plain:.2f}x | {vs_ref} |")


def time_trials(stepper: ScaleStepper, device: torch.device, every: list[int], steps: int, on_cpu: bool) -> None:
    """Time `steps` training steps per train.iso_every value (the same coins for each) against as many baseline steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if on_cpu else time.perf_counter
    times: dict[int | None, tuple[float, int]] = {}
    for n in [None, *every]:
        sync()
        t0 = clock()
        taken = stepper.trial(n, steps)
        sync()
        times[n] = (clock() - t0, taken)
        print(f"#   trial iso_every={n if n is not None else '- (baseline)'}: {times[n][0]:.1f} s, {taken} of {steps} steps "
              "with the isometry term", file=sys.stderr, flush=True)
    base = times[None][0]
    print()
    print(f"Timed: {steps} training steps per row (the coin of each step seeded alike in every row, p = {P_SPLIT}; "
          f"{'CPU' if on_cpu else 'wall'} time), against {steps} baseline steps:")
    print()
    print_iso_every_table((f"0 of {steps}", base / steps),
                          [(n, f"{times[n][1]} of {steps}", times[n][0] / steps) for n in every], "time per step")


def profile_step(step, label: str, device: torch.device, warmup: int) -> int:
    """One step under torch.profiler (after `warmup` steps): GPU busy vs wall time, launches, the costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(max(warmup, 1)):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        wall0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - wall0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6  # kernel durations, microseconds -> seconds (overlaps counted twice)
    print()
    print(f"## profile: {label}, one step")
    print(f"wall {wall:.3f} s (under the profiler); GPU kernels {len(kernels):,}, their summed time {busy:.3f} s = "
          f"{busy / wall:.0%} of the wall; mean kernel {1e6 * busy / max(len(kernels), 1):.0f} us")
    averages = prof.key_averages()
    for sort, rows in ((("self_device_time_total", 25),) if on_gpu else ()) + (("self_cpu_time_total", 15),):
        try:
            print(averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60))
        except (AttributeError, KeyError, ValueError):  # torch < 2.4 names it self_cuda_time_total
            print(averages.table(sort_by=sort.replace("device", "cuda"), row_limit=rows, max_name_column_width=60))
    return 0


def run_estimator(args: argparse.Namespace) -> int:
    """L_iso on the first k samples of a micro-batch of `--batch`: its spread, bias and gradient error against k = batch."""
    torch.manual_seed(args.seed)
    unet = build_unet("small", 16, attention=True).train()
    params = [p for p in unet.parameters()]
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    gen = torch.Generator().manual_seed(args.seed)
    b = args.batch
    ks = sorted({k for k in (1, 2, 4, b // 2, b) if 1 <= k <= b})
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    grads: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for _ in range(args.draws):
        x0 = torch.rand(b, 3, 32, 32, generator=gen) * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.full((b,), int(torch.randint(iso_cutoff(P_SPLIT, T), T, (1,), generator=gen)))
        probes = torch.randn(x0.shape, generator=gen)
        x_t = add_noise(x0, noise, t, abar)
        for k in ks:  # paired: the same samples, probes and t for every k
            tr_r, tr_r2 = isometry_terms(encoder_at(unet, t[:k]), x_t[:k], probes=probes[:k])
            loss = isometry_ratio(tr_r, tr_r2)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            ratios[k].append(loss.item())
            grads[k].append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)]))
    full_mean = statistics.fmean(ratios[b])
    g_full = torch.stack(grads[b])
    var_full = g_full.var(0).sum()
    print(f"# L_iso estimator on a sub-batch: bench/iso_step.py's small UNet (32 px, random weights), micro-batch {b}, "
          f"{args.draws} draws (x0 ~ U[-1, 1], one t_iso ~ U[{iso_cutoff(P_SPLIT, T)}, {T}) per draw, one probe per sample; "
          f"every k on the same draws); torch {torch.__version__}")
    print()
    print("| k (iso samples) | mean L_iso | relative sd of L_iso | bias vs k = batch (+- 2 s.e.) | "
          "gradient variance vs k = batch | cos(mean gradient, k = batch's) |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        r = torch.tensor(ratios[k], dtype=torch.float64)
        diff = r / full_mean - torch.tensor(ratios[b], dtype=torch.float64) / full_mean  # paired, so the draws' spread cancels
        gk = torch.stack(grads[k])
        cos = F.cosine_similarity(gk.mean(0), g_full.mean(0), dim=0).item()
        print(f"| {k} | {r.mean():.4g} | {(r.std() / r.mean()).item():.1%} | {diff.mean().item():+.1%} +- "
              f"{2 * diff.std().item() / len(diff) ** 0.5:.1%} | {(gk.var(0).sum() / var_full).item():.2f}x | {cos:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="images per micro-batch (default 2; --estimator: 8; the paper: 8 per GPU)")
    parser.add_argument("--iso-batch", type=int, default=1, help="samples the isometry term uses in the iso+levers variant (train.iso_batch)")
    parser.add_argument("--no-share", action="store_true", help="iso+levers without the shared encoder pass (train.iso_shared_forward: false)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (Adam's state, allocator)")
    parser.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast for the denoising pass")
    parser.add_argument("--channels-last", action="store_true", help="model and batch in channels_last memory format")
    parser.add_argument("--variants", default="plain,iso,iso_levers,reference", help="comma-separated, of plain, iso, iso_levers, iso_sub, reference")
    parser.add_argument("--resolution", type=int, default=256, help="image side (256: the real model)")
    parser.add_argument("--channels", type=int, default=128, help="first level's channels (128: the real model)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: OpenMP threads stall on a CPU shared with other jobs; 0: torch's choice)")
    parser.add_argument("--iso-every", default="1,2,4,8", type=lambda v: [int(x) for x in v.split(",") if x.strip()],
                        help="train.iso_every values for the derived per-trial table (empty: none)")
    parser.add_argument("--trial-steps", type=int, default=0, help="also time this many training steps per --iso-every "
                        "value (the coin and lazy rhythm of training) against as many baseline steps")
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="CUDA: profile one step of VARIANT instead of timing (where its time goes)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: let cuDNN time and pick its convolution algorithms")
    parser.add_argument("--estimator", action="store_true", help="measure the sub-batch estimator's spread instead (small UNet)")
    parser.add_argument("--draws", type=int, default=24, help="--estimator: micro-batches drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 8 if args.estimator else 2
    if args.iso_batch is not None and not 1 <= args.iso_batch <= args.batch:
        parser.error(f"--iso-batch must lie in [1, --batch={args.batch}]")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.estimator:
        return run_estimator(args)
    return run_scale(args)


if __name__ == "__main__":
    sys.exit(main())
