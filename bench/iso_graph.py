"""The isometry training step without host syncs: eager, and captured whole as one CUDA graph, against today's step.

On a GPU the 256 px isometry step is bound by the CPU issuing kernels (docs/benchmarks.md, "Where the isometry step's
time goes"). A CUDA graph replays all of a step's kernels from one launch, but only a step that reads nothing on the
host and copies nothing to the device can be captured. Each variant is a whole optimizer step (forward, the isometry
term's JVP and VJP with create_graph, backward, Adam) of isosweep's loss (`IsoDiffusionLoss`, per_timestep, the
`--iso-batch` sub-batch and the shared encoder pass: the levers of the 256 px figures) with the isometry term on, on one
fixed batch copied into the step's input buffer:

  (a) plain      the denoising step (lambda_iso = 0: t ~ U[0, T)), draws on the device, Adam
  (b) eager      today's training step: the loop's CPU generators (timesteps, noise and probes drawn on the CPU and
                 copied, t_iso read on the host), the share_forward check (torch.equal), the finite flags read each step
  (c) sync-free  the same loss reading nothing on the host: generators on the device (`core.step.step_generators`),
                 `drawn=True`, `FiniteFlags` read once after the timed steps, Adam(capturable=True)
  (d) graph      (c) captured whole with torch.cuda.graph (CUDA only): the input refilled by copy_, the device
                 generators registered with the graph and re-seeded in place from (seed, step, rank) before each replay
  (e) compile    (--compile) torch.compile of (c)'s step, tried last; a failure is printed in one line

The coin stays a host decision (a CPU draw, no device involved): in training it would pick which of two captured graphs
to replay; here every step takes the isometry term, as bench/scale.py's iso_levers. In no variant: the EMA update,
gradient clipping, the loss statistics, DDP. Timing: after `--warmup` steps, the median of `--repeats` steps each
synchronised (wall time on CUDA, CPU time on a CPU), and the mean over `--repeats` steps issued back to back with one
synchronisation at the end (where a step that never syncs lets the CPU run ahead of the GPU). Memory: the peak
allocated above the level before the variant (CUDA; the CPU: peak RSS). After the timed replays, (d) is checked against
(c) on the same step: the same draws, and its loss, gradients and updated weights within float tolerance.

    python -m bench.iso_graph                   # CPU, small UNet: (a)-(c), the capture skipped; under a minute
    python -m bench.iso_graph --device cuda --layout celebahq --resolution 256 --channels 128 --batch 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diffusers
import torch

from bench.iso_step import LAMBDA_ISO, P_SPLIT, T, PeakMemory, build_unet
from isosweep.core.losses import IsoDiffusionLoss
from isosweep.core.step import FiniteFlags, reseed, step_generators

RANK = 0
LABELS = {"plain": "(a) plain denoising step", "eager": "(b) isometry step, today's eager path",
          "sync_free": "(c) isometry step, sync-free, eager", "graph": "(d) isometry step, sync-free, one CUDA graph",
          "compile": "(e) isometry step, sync-free, torch.compile"}


@dataclass
class Timing:
    synced: float  # median seconds per step, synchronised each step (CPU time on a CPU)
    piped: float  # seconds per step over steps issued back to back (wall)
    mib: float  # peak memory above the level before the variant
    note: str = ""


class Steps:
    """The model, two Adams (today's and a capturable one), the schedule, the batch and the input buffer."""

    def __init__(self, unet, batch: torch.Tensor, *, iso_batch: int, share: bool, amp: torch.dtype | None, seed: int):
        self.unet, self.batch, self.amp, self.seed, self.step = unet, batch, amp, seed, 0
        self.device = batch.device
        self.params = list(unet.parameters())
        self.x0 = torch.empty_like(batch)  # the static input: every variant copies the batch in
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0).to(device=self.device, dtype=torch.float32)
        common = {"p": P_SPLIT, "timesteps": T, "iso_timesteps": "per_timestep"}
        self.plain_loss = IsoDiffusionLoss(lambda_iso=0.0, **common)
        self.loss = IsoDiffusionLoss(lambda_iso=LAMBDA_ISO, iso_batch=iso_batch, share_forward=share, **common)
        self.opt = torch.optim.Adam(self.params, lr=1e-4)
        self.opt_graph = torch.optim.Adam(self.params, lr=1e-4, capturable=self.device.type == "cuda")  # the CPU has none
        for opt in (self.opt, self.opt_graph):  # both Adams' state now, on zero gradients (weights unchanged)
            for p in self.params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.gens = step_generators(seed, 0, RANK, device=self.device)  # (a), (c), (d), (e): drawn on the device
        self.finite = FiniteFlags(self.device)

    def _autocast(self, cache: bool = True):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None, cache_enabled=cache)

    def _next(self) -> int:
        self.step += 1
        return self.step

    def plain(self) -> None:
        reseed(self.gens, self.seed, self._next(), RANK)
        self.x0.copy_(self.batch)
        self.opt.zero_grad(set_to_none=True)
        d = self.plain_loss.draw(self.x0, False, self.gens.local, self.gens.shared)
        with self._autocast():
            out = self.plain_loss(self.unet, self.unet, self.x0, d.t, d.noise, False, self.abar, drawn=True)
        out.loss.backward()
        self.opt.step()

    def eager(self) -> None:
        """The training loop's step as it runs today (one micro-batch)."""
        step = self._next()
        gens = step_generators(self.seed, step, RANK)  # CPU: the coin is the shared generator
        self.loss.coin(gens.coin)  # drawn as training draws it; this bench takes the term whatever it says
        self.x0.copy_(self.batch)
        self.opt.zero_grad(set_to_none=True)
        d = self.loss.draw(self.x0, True, gens.local, gens.shared)
        with self._autocast():
            out = self.loss(self.unet, self.unet, self.x0, d.t, d.noise, True, self.abar, generator=gens.local, t_iso=d.t_iso)
        finite = FiniteFlags(self.device, since=step)
        finite.observe(out.dsm, out.iso)
        out.loss.backward()
        if finite.first() is not None:  # the loop's check_finite: one read per step
            raise FloatingPointError(f"non-finite loss at step {step}: {finite.first()}")
        self.opt.step()

    def prepare(self, step: int) -> None:
        """Host side of a sync-free step: the step's seeds into the device generators, the coin, the batch in."""
        reseed(self.gens, self.seed, step, RANK)
        self.loss.coin(self.gens.coin)
        self.x0.copy_(self.batch)

    def body(self):
        """The device-only part of the step: what the CUDA graph captures. Returns its loss and draw."""
        d = self.loss.draw(self.x0, True, self.gens.local, self.gens.shared)
        with self._autocast(cache=False):  # autocast's weight cache must be off inside a capture
            out = self.loss(self.unet, self.unet, self.x0, d.t, d.noise, True, self.abar, generator=self.gens.local,
                            t_iso=d.t_iso, drawn=True)
        self.finite.observe(out.dsm, out.iso)
        out.loss.backward()
        self.opt_graph.step()
        return out.loss.detach(), d

    def sync_free(self) -> None:
        self.prepare(self._next())
        self.opt_graph.zero_grad(set_to_none=True)
        self.body()

    def capture(self, warmup: int) -> Callable[[], None]:
        """Warm up on a side stream, capture `body` into one graph; returns the replaying step."""
        graph = torch.cuda.CUDAGraph()
        for gen in (self.gens.shared, self.gens.local):
            graph.register_generator_state(gen)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                self.sync_free()
        torch.cuda.current_stream().wait_stream(side)
        self.prepare(self._next())
        self.opt_graph.zero_grad(set_to_none=True)
        before = torch.cuda.memory_reserved()
        with torch.cuda.graph(graph):
            self.static_loss, self.static_draw = self.body()
        self.pool_gib = (torch.cuda.memory_reserved() - before) / 2**30
        self.graph, self.static_grads = graph, [p.grad for p in self.params]

        def replay() -> None:
            self.prepare(self._next())
            graph.replay()

        return replay

    def check_graph(self) -> str:
        """One step of (c) eager and the same step replayed, from the same weights, Adam state and seeds."""
        state = [[v for v in self.opt_graph.state[p].values() if torch.is_tensor(v)] for p in self.params]
        saved = ([p.detach().clone() for p in self.params], [[v.clone() for v in s] for s in state])
        step = self._next()
        self.prepare(step)
        self.opt_graph.zero_grad(set_to_none=True)
        loss, d = self.body()
        eager = (loss.clone(), [p.grad.clone() for p in self.params], [p.detach().clone() for p in self.params])
        with torch.no_grad():
            for p, w in zip(self.params, saved[0]):
                p.copy_(w)
            for s, values in zip(state, saved[1]):
                for v, w in zip(s, values):
                    v.copy_(w)
        for p, g in zip(self.params, self.static_grads):
            p.grad = g  # the graph's own gradient buffers
        self.prepare(step)
        self.graph.replay()
        torch.cuda.synchronize()
        same_draws = all(torch.equal(a, b) for a, b in zip(self.static_draw, d) if torch.is_tensor(a))
        grad_diff = max((g - e).abs().max().item() for g, e in zip(self.static_grads, eager[1]))
        grad_scale = max(e.abs().max().item() for e in eager[1])
        weight_diff = max((p - e).abs().max().item() for p, e in zip(self.params, eager[2]))
        loss_diff = (self.static_loss - eager[0]).abs().item()
        ok = same_draws and grad_diff <= 1e-4 * grad_scale + 1e-12 and loss_diff <= 1e-5 * abs(eager[0].item()) + 1e-12
        return (f"(d) against (c) on step {step}: same draws (t, t_iso, noise): {same_draws}; |loss diff| {loss_diff:.3g} "
                f"(loss {eager[0].item():.6g}); max |grad diff| {grad_diff:.3g} (max |grad| {grad_scale:.3g}); max |weight diff| "
                f"after Adam {weight_diff:.3g}: {'equal within float tolerance' if ok else 'DIFFER'}")


def failure(e: BaseException) -> str:
    """One line for a variant that failed: the root exception (a failed capture raises again on leaving the capture,
    hiding what failed inside it) and its innermost frames, where a capture's culprit is."""
    root = e
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    frames = traceback.extract_tb(root.__traceback__)[-6:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    line = (str(root).strip().splitlines() or [""])[0][:300]
    outer = f" (then {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]})" if root is not e else ""
    return f"{type(root).__name__}: {line} [at {where}]{outer}"


def sync_probe(step: Callable[[], None]) -> str:
    """Run one step under torch.cuda's sync debug mode: how many synchronising calls it made, and the first."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]
    torch.cuda.synchronize()
    return f"{len(syncs)} synchronising call(s)" + (f", at {', '.join(dict.fromkeys(syncs))}" if syncs else "")


def time_variant(step: Callable[[], None] | None, device: torch.device, warmup: int, repeats: int,
                 prepare: Callable[[], Callable[[], None]] | None = None) -> Timing:
    """Warm-up, `repeats` synchronised steps (median), `repeats` back-to-back steps (mean); peak memory over it all."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    with PeakMemory(device) as mem:
        if prepare is not None:
            step = prepare()
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(repeats):
            sync()
            t0 = clock()
            step()
            sync()
            times.append(clock() - t0)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        piped = (time.perf_counter() - t0) / repeats
    return Timing(statistics.median(times), piped, mem.mib)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores visible)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layout", choices=("small", "celebahq"), default="small", help="bench/iso_step.py's UNet layouts")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16, help="first level's channels (the real model: 128)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (the paper: 8 per GPU)")
    parser.add_argument("--iso-batch", type=int, default=2, help="samples the isometry term uses (train.iso_batch)")
    parser.add_argument("--no-share", action="store_true", help="without the shared encoder pass (train.iso_shared_forward)")
    parser.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast for the denoising pass, as training")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="plain,eager,sync_free,graph", help=f"comma-separated, of {', '.join(LABELS)}")
    parser.add_argument("--compile", action="store_true", help="also try (e), torch.compile of the sync-free step, last")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (0: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] + (["compile"] if args.compile else [])
    if set(wanted) - set(LABELS):
        parser.error(f"unknown variants {sorted(set(wanted) - set(LABELS))}; choose from {list(LABELS)}")
    if not 1 <= args.iso_batch <= args.batch:
        parser.error(f"--iso-batch must lie in [1, --batch={args.batch}]")
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.bf16 and device.type != "cuda":
        parser.error("--bf16 is for --device cuda")

    # Adam(capturable=True) warns on every eager step that it is not being captured: (c) and (e) are eager on purpose
    warnings.filterwarnings("ignore", message=".*capturable=True.*")
    torch.manual_seed(args.seed)
    unet = build_unet(args.layout, args.channels, attention=True).to(device).train()
    batch = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(args.seed))
             * 2 - 1).to(device)
    steps = Steps(unet, batch, iso_batch=args.iso_batch, share=not args.no_share,
                  amp=torch.bfloat16 if args.bf16 else None, seed=args.seed)
    command = ("python -m bench.iso_graph " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    print(f"# iso step as one CUDA graph: {_machine(device)}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"Python {platform.python_version()}; {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# $ {command}")
    print(f"# UNet {args.layout}, channels={args.channels}, {sum(p.numel() for p in steps.params):,} parameters (random "
          f"weights); resolution={args.resolution} batch={args.batch} iso_batch={args.iso_batch} share={not args.no_share} "
          f"bf16={args.bf16} warmup={args.warmup} repeats={args.repeats} p={P_SPLIT} lambda_iso={LAMBDA_ISO}")
    sys.stdout.flush()

    cuda = device.type == "cuda"
    results: dict[str, Timing] = {}
    notes: list[str] = []
    for name in wanted:
        if name == "graph" and not cuda:
            print(f"{LABELS[name]}: skipped (a CUDA graph needs --device cuda; the CPU runs (a)-(c) only)", flush=True)
            continue
        try:
            if name == "graph":
                if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
                    raise RuntimeError(f"torch {torch.__version__} has no CUDAGraph.register_generator_state: "
                                       "device generators cannot be captured")
                result = time_variant(None, device, args.warmup, args.repeats, prepare=lambda: steps.capture(args.warmup))
                result.note = f"graph pool {steps.pool_gib:.2f} GiB reserved"
            elif name == "compile":
                body = torch.compile(steps.body)

                def compiled() -> None:
                    steps.prepare(steps._next())
                    steps.opt_graph.zero_grad(set_to_none=True)
                    body()

                result = time_variant(compiled, device, args.warmup, args.repeats)
            else:
                step = getattr(steps, name)
                if cuda and name in ("eager", "sync_free"):
                    step()  # first call outside the probe: one-off set-up (cuDNN, the GroupNorm probe) is not the step
                    notes.append(f"{LABELS[name]}, one step under torch.cuda.set_sync_debug_mode: {sync_probe(step)}")
                result = time_variant(step, device, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001  (one variant's failure is a result: print it, go on)
            print(f"{LABELS[name]}: FAILED: {failure(e)}", flush=True)
            continue
        results[name] = result
        print(f"{LABELS[name]}: {result.synced * 1e3:.1f} ms per step (synchronised), {result.piped * 1e3:.1f} ms back to "
              f"back, peak {result.mib / 1024:.2f} GiB{'; ' + result.note if result.note else ''}", flush=True)
        if name == "graph":
            try:
                notes.append(steps.check_graph())
            except Exception as e:  # noqa: BLE001
                notes.append(f"(d) against (c): the check FAILED: {failure(e)}")
            print(notes[-1], flush=True)
    if cuda and {"sync_free", "graph", "compile"} & set(results):
        try:
            bad = steps.finite.first()  # the sync-free variants' flags, read once here
            notes.append("finite flags of the sync-free steps, read once at the end: " + ("all finite" if bad is None else f"NON-FINITE {bad}"))
        except Exception as e:  # noqa: BLE001  (a capture that failed can leave the device unusable: still print the table)
            notes.append(f"finite flags: the read FAILED: {failure(e)}")

    print()
    time_kind = "wall" if cuda else "CPU time"
    print(f"| step | median per step ({time_kind}, synchronised) | vs (a) | per step, back to back (wall) | vs (a) | "
          f"peak {'GPU memory allocated' if cuda else 'RSS increase'} | memory vs (a) |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("plain")

    def vs(value: float, of: float | None) -> str:
        return f"{value / of:.2f}x" if of else "-"

    for name, r in results.items():
        print(f"| {LABELS[name]} | {r.synced * 1e3:.1f} ms | {vs(r.synced, base and base.synced)} | {r.piped * 1e3:.1f} ms | "
              f"{vs(r.piped, base and base.piped)} | {r.mib / 1024:.2f} GiB | {vs(r.mib, base and base.mib)} |")
    if not args.compile:
        notes.append(f"{LABELS['compile']}: not run (--compile tries it): bench/compile_check.py found the term compiles "
                     "only in fragments, and this whole step fails inside torch.func.jvp's make_dual under dynamo (torch 2.14, CPU)")
    print()
    for line in notes:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
