"""What one isometry training step costs, against a plain denoising step and the reference recipe.

Variants (each a whole optimizer step: forward, backward, Adam update, on the same batch):
  (a) plain        denoising (epsilon MSE) step, fast attention kernels
  (b) ours         denoising + isometry, one shared encoder pass: one forward-mode JVP of the encoder
                   (torch.func.jvp), one VJP with create_graph, the UNet finished from the same pass
  (b') ours-split  the same loss with the denoising forward run separately on the fast kernels
  (c) reference    denoising + isometry as the public implementation computes it: h from the full
                   UNet forward (hook), in the stereographic chart, two double-backward
                   torch.autograd.functional.jvp calls and one vjp, all with create_graph

Reports the median wall time after warm-up, the peak memory of each variant (CPU: peak resident set
size above the process's level before the variant, reset between variants through
/proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated), the ratios b/a and b/c, and the
expected cost of a fine-tuning epoch at p = 0.5 (half the batches plain, half with the isometry
loss) relative to a plain epoch. Targets: b/c <= 0.40, b/a <= 3.0, epoch <= 2.0x.

    python -m bench.iso_step                                   # about a minute on 2 CPU cores
    python -m bench.iso_step --layout celebahq --resolution 256 --channels 128 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from isosweep.core.geometry import inverse_stereographic, isometry_loss, isometry_ratio, isometry_terms, stereographic  # noqa: E402
from isosweep.core.hspace import decode, encoder_at  # noqa: E402

T = 1000  # DDPM steps (linear beta schedule)
P_SPLIT = 0.5  # fraction of the schedule without the isometry loss
LAMBDA_ISO = 1e-4


def build_unet(layout: str, channels: int, attention: bool) -> UNet2DModel:
    """A small UNet2DModel ('small': 4 levels) or the CelebA-HQ DDPM's layout ('celebahq': 6 levels)."""
    attn_down, attn_up = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
    c = channels
    if layout == "small":
        return UNet2DModel(
            block_out_channels=(c, c, 2 * c, 2 * c),
            down_block_types=("DownBlock2D", "DownBlock2D", attn_down, "DownBlock2D"),
            up_block_types=("UpBlock2D", attn_up, "UpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            attention_head_dim=None,
            norm_num_groups=min(32, c // 4) or 1,
            add_attention=attention,
        )
    return UNet2DModel(  # google/ddpm-ema-celebahq-256 with block_out_channels scaled by channels/128
        block_out_channels=(c, c, 2 * c, 2 * c, 4 * c, 4 * c),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", attn_down, "DownBlock2D"),
        up_block_types=("UpBlock2D", attn_up, "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=min(32, c // 4) or 1,
        add_attention=attention,
    )


class Stepper:
    """Holds the model, optimizer, schedule and one fixed batch; each method is one training step."""

    def __init__(self, unet: UNet2DModel, x0: torch.Tensor, seed: int = 0):
        self.unet = unet
        self.x0 = x0
        self.opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0).to(device=x0.device, dtype=x0.dtype)
        self.gen = torch.Generator(device=x0.device).manual_seed(seed)

    def _noisy(self, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.x0.shape[0]
        t = torch.randint(low, high, (b,), generator=self.gen, device=self.x0.device)
        eps = torch.randn(self.x0.shape, generator=self.gen, device=self.x0.device, dtype=self.x0.dtype)
        a = self.abar[t].view(b, 1, 1, 1)
        return a.sqrt() * self.x0 + (1 - a).sqrt() * eps, t, eps

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def plain(self) -> None:
        x_t, t, eps = self._noisy(0, T)
        self._update(torch.nn.functional.mse_loss(self.unet(x_t, t).sample, eps))

    def ours(self) -> None:
        x_t, t, eps = self._noisy(int(P_SPLIT * T), T)
        tr_r, tr_r2, enc = isometry_terms(encoder_at(self.unet, t, with_skips=True), x_t, generator=self.gen, has_aux=True)
        pred = decode(self.unet, enc.h, enc.skips, enc.emb, enc.timesteps)
        self._update(torch.nn.functional.mse_loss(pred, eps) + LAMBDA_ISO * isometry_ratio(tr_r, tr_r2))

    def ours_split(self) -> None:
        x_t, t, eps = self._noisy(int(P_SPLIT * T), T)
        dsm = torch.nn.functional.mse_loss(self.unet(x_t, t).sample, eps)
        self._update(dsm + LAMBDA_ISO * isometry_loss(encoder_at(self.unet, t), x_t, generator=self.gen))

    def reference(self) -> None:
        x_t, t, eps = self._noisy(int(P_SPLIT * T), T)
        dsm = torch.nn.functional.mse_loss(self.unet(x_t, t).sample, eps)
        self._update(dsm + LAMBDA_ISO * reference_isometry_loss(self.unet, x_t, t, self.gen))


def reference_isometry_loss(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The public recipe: full-UNet h via a hook, chart coordinates, 2 double-backward JVPs + 1 VJP."""
    b = x.shape[0]
    captured = {}

    def h_of_z(z: torch.Tensor) -> torch.Tensor:
        handle = unet.mid_block.register_forward_hook(lambda module, args, out: captured.update(h=out))
        try:
            unet(inverse_stereographic(z, r).reshape(x.shape), t)
        finally:
            handle.remove()
        return captured["h"]

    r = x.reshape(b, -1).norm(dim=1)
    z = stereographic(x)
    zs = z.pow(2).sum(1, keepdim=True)
    g = 4 * r[:, None] ** 2 / (1 + zs) ** 2  # G = g I
    v = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
    with sdpa_kernel(SDPBackend.MATH):  # flash attention has no double backward
        _, j_ginvhalf_v = torch.autograd.functional.jvp(h_of_z, z, v / g.sqrt(), create_graph=True)
        _, j_ginv_v = torch.autograd.functional.jvp(h_of_z, z, v / g, create_graph=True)
        _, jtj_ginv_v = torch.autograd.functional.vjp(h_of_z, z, j_ginv_v, create_graph=True)
    tr_r = j_ginvhalf_v.reshape(b, -1).pow(2).sum(1)
    tr_r2 = jtj_ginv_v.reshape(b, -1).pow(2).sum(1)
    return tr_r2.mean() / tr_r.mean() ** 2


# --- measurement -------------------------------------------------------------------------------------


def _release_cpu_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block in MiB, above the level when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_cpu_memory()
            self.exact = _reset_peak_rss()
            self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = _status_kb("VmHWM")
            # without a resettable high-water mark, ru_maxrss is the whole process's peak so far
            peak = hwm * 1024 if (hwm is not None and self.exact) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = (peak - self.start) / 2**20


def measure(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, tuple[float, float, float, bool]]:
    """Run the variants round-robin (so machine load drifts hit all alike): warm-up rounds, then timed.

    Returns, per variant: median wall seconds, median CPU seconds of this process (user + system;
    on a shared CPU it excludes the time spent waiting for a core), peak memory in MiB, exact flag.
    """
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = {name: 0.0 for name in steps}
    exact = True
    for i in range(warmup + repeats):
        for name, step in steps.items():
            with PeakMemory(device) as mem:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall0, cpu0 = time.perf_counter(), time.process_time()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            peaks[name] = max(peaks[name], mem.mib)
            exact = exact and mem.exact
            if i >= warmup:
                walls[name].append(wall)
                cpus[name].append(cpu)
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name]), peaks[name], exact) for name in steps}


def print_iso_every_table(baseline: tuple[str, float], rows: list[tuple[int, str, float]], time_header: str) -> None:
    """The Markdown table of seconds per step against the baseline's, one row per train.iso_every value:
    baseline = (share of steps with the term, seconds), rows = [(n, share, seconds), ...]."""
    share, base = baseline
    print(f"| train.iso_every (n) | steps with the isometry term | {time_header} | vs the baseline |")
    print("|---|---|---|---|")
    print(f"| baseline (lambda_iso = 0) | {share} | {base:.3f} s | 1.00x |")
    for n, share, seconds in rows:
        print(f"| {n} | {share} | {seconds:.3f} s | {seconds / base:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--channels", type=int, default=16, help="channels of the first level (CelebA-HQ DDPM: 128)")
    parser.add_argument("--layout", choices=("small", "celebahq"), default="small", help="4-level UNet or the CelebA-HQ DDPM's 6 levels")
    parser.add_argument("--attention", choices=("on", "off"), default="on", help="attention blocks in the encoder and decoder")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="plain,ours,ours_split,reference", help="comma-separated subset to run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 by default: OpenMP threads stall on a CPU shared with other jobs (0: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    unet = build_unet(args.layout, args.channels, args.attention == "on").to(device).train()
    x0 = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    stepper = Stepper(unet, x0, seed=args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    enc_params = sum(p.numel() for n, p in unet.named_parameters() if not n.startswith(("up_blocks", "conv_norm_out", "conv_out")))

    labels = {
        "plain": "(a) plain denoising step",
        "ours": "(b) ours: denoising + isometry, shared encoder pass, 1 JVP + 1 VJP",
        "ours_split": "(b') ours, denoising forward separate (fast kernels)",
        "reference": "(c) reference: full UNet, 2 double-backward JVPs + 1 VJP",
    }
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(labels))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(labels)}")

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores visible)"
    )
    print(f"# isometry step benchmark: {device_name}, torch {torch.__version__}")
    print(
        f"# layout={args.layout} channels={args.channels} attention={args.attention} resolution={args.resolution} "
        f"batch={args.batch} warmup={args.warmup} repeats={args.repeats}; "
        f"UNet {n_params / 1e6:.2f} M parameters, encoder {enc_params / 1e6:.2f} M"
    )
    results = measure({name: getattr(stepper, name) for name in wanted}, device, args.warmup, args.repeats)

    on_cpu = device.type == "cpu"
    basis = 1 if on_cpu else 0  # ratios from CPU time on a CPU (robust to a shared machine), wall time on a GPU
    mem_kind = "peak RSS increase" if on_cpu else "peak GPU memory allocated"
    print()
    print(f"| step | median wall | median CPU time | {mem_kind} |")
    print("|---|---|---|---|")
    for name, (wall, cpu, mib, exact) in results.items():
        approx = "" if exact else " (process peak; not resettable here)"
        cpu_text = f"{cpu * 1e3:.0f} ms" if on_cpu else "-"
        print(f"| {labels[name]} | {wall * 1e3:.0f} ms | {cpu_text} | {mib:.0f} MiB{approx} |")
    print()
    print(f"Ratios of median {'CPU' if on_cpu else 'wall'} time:")
    print()
    print("| ratio | value | target |")
    print("|---|---|---|")

    def ratio(num: str, den: str) -> float:
        return results[num][basis] / results[den][basis]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if "plain" in results and "ours" in results:
        b_over_a = ratio("ours", "plain")
        epoch = P_SPLIT + (1 - P_SPLIT) * b_over_a
        print(f"| b/a | {b_over_a:.2f} | <= 3.0: {verdict(b_over_a <= 3.0)} |")
        print(f"| epoch at p = {P_SPLIT} vs plain epoch ({P_SPLIT} + {1 - P_SPLIT} b/a) | {epoch:.2f}x | <= 2.0: {verdict(epoch <= 2.0)} |")
    if "ours" in results and "reference" in results:
        b_over_c = ratio("ours", "reference")
        print(f"| b/c | {b_over_c:.2f} | <= 0.40: {verdict(b_over_c <= 0.40)} |")
    if "ours_split" in results and "plain" in results:
        print(f"| b'/a (split variant) | {ratio('ours_split', 'plain'):.2f} | |")
    if "ours_split" in results and "reference" in results:
        print(f"| b'/c (split variant) | {ratio('ours_split', 'reference'):.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
