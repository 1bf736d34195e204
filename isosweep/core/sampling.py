"""Deterministic DDIM sampling (eta = 0) from a diffusers UNet2DModel, in batches (docs/math.md section 5).

Sampling is the inner loop of every metric, so it is batched, runs under `torch.inference_mode`, and can
capture the bottleneck h (the output of `unet.mid_block`) at every step for mRTL. Initial noise is drawn
per sample index from its own generator: sample i's noise depends only on (seed, stream, i), so a
sharded evaluation draws exactly the latents a single process would.

Precision (`precision=`): "fp32" (the default, and the only choice that reproduces the recorded metrics) or,
on a GPU, "bf16"/"fp16" autocast of the UNet forward with x_t and the DDIM update kept in float32. Which
metric tolerates what, and what TF32 does, is in `ddim_sample`'s docstring; docs/benchmarks.md ("Sampling")
has the throughput and the measured size of the bf16 error.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler

from isosweep.core.codec import Codec
from isosweep.core.hspace import autodiff_safe
from isosweep.core.progress import progress_bar

__all__ = ["GRAD_MODES", "PRECISIONS", "TANGENT_PRECISIONS", "DDIMSampler", "SampleOutput", "Sampler", "ddim_sample",
           "ddim_scheduler", "bf16_copy", "ddim_tangent", "index_generator", "initial_noise"]

Precision = Literal["fp32", "bf16", "fp16"]
GradMode = Literal["inference", "no_grad"]
# precision -> autocast dtype of the UNet forward (None: no autocast, the UNet's own dtype)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_MODES: tuple[str, ...] = ("inference", "no_grad")
# precisions of `ddim_tangent`: fp32 with TF32 off, TF32 convolutions and matmuls, bf16 autocast of the UNet forward
TANGENT_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


@dataclass
class SampleOutput:
    """What `ddim_sample` returns.

    images: (B, C, H, W) float32 in [-1, 1], on the CPU.
    h: (num_steps, B, *h_shape) float32 bottleneck features at every step (input x_t of that step), or None.
    timesteps: the DDIM timesteps, in the order they were run (high noise first).
    """

    images: torch.Tensor
    h: torch.Tensor | None
    timesteps: list[int]


class Sampler(Protocol):
    """Anything that turns initial noise into images: the interface the metrics use."""

    def __call__(self, x_T: torch.Tensor, num_steps: int, *, capture_h: bool = False) -> SampleOutput: ...


def index_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, index) alone, through NumPy's SeedSequence (no collisions
    between nearby seeds and indices, unlike seed + index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def initial_noise(
    n: int, shape: Sequence[int], seed: int, *, start: int = 0, stream: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise for samples start .. start+n-1: (n, *shape) on the CPU.

    Sample i's noise depends only on (seed, stream, i), so `initial_noise(4, s, 0)` equals the concatenation
    of `initial_noise(2, s, 0)` and `initial_noise(2, s, 0, start=2)`. `stream` separates independent
    draws under one seed (e.g. the two ends of an interpolation pair).
    """
    shape = tuple(int(d) for d in shape)
    out = torch.empty((n, *shape), dtype=dtype)
    for k in range(n):
        out[k] = torch.randn(shape, generator=index_generator(seed, start + k, stream), dtype=dtype)
    return out


def sample_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of a UNet2DModel's images, from its config."""
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.in_channels), int(h), int(w))


def ddim_scheduler(scheduler, num_steps: int) -> DDIMScheduler:
    """The DDIM schedule of `num_steps` steps for a model's training scheduler: a fresh `DDIMScheduler` built from its
    config (as diffusers' DDIMPipeline does; the caller's scheduler is not modified), timesteps set. The one place
    the sampling schedule is made, so that the inversion (`core.inversion`) walks the same timesteps backwards."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    return ddim


def _unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


def _unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def ddim_sample(
    unet: torch.nn.Module,
    scheduler,
    x_T: torch.Tensor,
    num_steps: int,
    *,
    batch_size: int = 64,
    capture_h: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: Precision = "fp32",
    grad_mode: GradMode = "inference",
) -> SampleOutput:
    """Run deterministic DDIM (eta = 0) from x_T: (B, C, H, W) -> images (B, C, H, W) in [-1, 1] on the CPU.

    `scheduler` is the model's training scheduler (any diffusers scheduler with a DDPM-style config); a
    fresh `DDIMScheduler.from_config(scheduler.config)` is built, as diffusers' DDIMPipeline does, so
    the caller's scheduler is not modified. With `capture_h`, the output of `unet.mid_block` at each step
    is returned as h (num_steps, B, *h_shape) float32 on the CPU. `batch_size` images run through the UNet
    at once; the result does not depend on it (up to float noise).

    The loop runs under `torch.inference_mode` (`grad_mode="no_grad"`: `torch.no_grad`, for benchmarks; same
    numbers). The returned tensors are ordinary tensors (unless the caller is itself in inference mode, as the
    metrics are): they are concatenated after the loop's inference mode ends, so they may go into autograd or
    be modified in place afterwards.

    precision:
      "fp32": the UNet runs in its own dtype (float32 for every isosweep model). On an Ampere or later GPU
        this is full float32 only with TF32 off: PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa)
        by default. `isosweep.evaluation.suite.evaluate_model` turns TF32 off around every metric
        (`full_float32_matmul`); a caller outside the suite must do so itself where the metric needs it.
      "bf16" / "fp16": the UNet forward under `torch.autocast` in that dtype (attention and convolutions in half
        precision, normalisations in float32); x_t, eps and the DDIM update are float32, so x_t itself is never
        rounded to half precision between steps. For throughput on a GPU (tensor cores). "fp16" is refused on
        a CPU; "bf16" runs there (emulated, about 16x slower than fp32 on this project's CPU) so that its
        effect can be measured.
    Which metric tolerates half precision (bench/sampling.py --precision-check; docs/benchmarks.md, "Sampling"):
      PPL does not. It is a finite difference of two decodes whose latents differ by eps = 1e-4 along a
        slerp, divided by eps^2 = 1e-8: the two images differ by ~1e-4, while rounding that differs between
        the two decodes is ~4e-3 relative in bf16 (2^-8) and ~5e-4 in fp16 and TF32 (2^-11). Measured on the
        trained 32 px shapes model, 20 steps: bf16 changed the per-pair PPL value by a median factor of about
        3,000 (fp32 at another batch size: 0.3 %). PPL needs "fp32" with TF32 off.
      FID, LS and the sample grid compare distributions: bf16 moved those samples by 0.018 rms (pixels in
        [-1, 1]; single pixels at shape edges by up to 0.9), against 5e-7 for fp32 at another batch size.
        Plausibly below FID's sampling error, but not measured: compare FID in fp32 and bf16 on the same
        seeds before recording half-precision metrics. mRTL's h (points 1/K apart on the path) stays "fp32"
        until measured too.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    device = torch.device(device) if device is not None else _unet_device(unet)
    autocast_dtype = _autocast_dtype(precision, device)
    context = torch.inference_mode() if grad_mode == "inference" else torch.no_grad()
    with context:
        images, hs, timesteps = _ddim_loop(unet, scheduler, x_T, num_steps, batch_size, capture_h, progress, device,
                                           autocast_dtype)
    # concatenated outside inference mode: ordinary tensors (one copy, which the concatenation makes anyway)
    h = torch.cat(hs, dim=1) if capture_h else None
    return SampleOutput(images=torch.cat(images, dim=0), h=h, timesteps=timesteps)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ValueError('precision="fp16" needs a GPU: on a CPU use "fp32" (evaluation) or "bf16" (to measure its effect)')
    return dtype


def _ddim_loop(unet, scheduler, x_T: torch.Tensor, num_steps: int, batch_size: int, capture_h: bool, progress: bool,
               device: torch.device, autocast_dtype: torch.dtype | None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The batches of `ddim_sample`: per-batch images (float32, CPU), per-batch h (steps, b, ...), timesteps."""
    ddim = ddim_scheduler(scheduler, num_steps)
    timesteps = [int(t) for t in ddim.timesteps]
    unet_dtype = _unet_dtype(unet)
    # x_t and the DDIM update in float32 at least (a half-precision UNet only sees a cast copy)
    state_dtype = torch.promote_types(unet_dtype, torch.float32)
    was_training = unet.training
    unet.eval()

    captured: list[torch.Tensor] = []
    handle = None
    if capture_h:
        handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu()))

    images, hs = [], []
    n = x_T.shape[0]
    total = -(-n // batch_size) * len(timesteps)
    bar = progress_bar(total=total, desc=f"DDIM {num_steps} steps", disable=not progress, leave=False)
    try:
        for lo in range(0, n, batch_size):
            x = x_T[lo : lo + batch_size].to(device=device, dtype=state_dtype)
            captured.clear()
            for t in timesteps:
                eps = _unet_forward(unet, x.to(unet_dtype), t, autocast_dtype).to(state_dtype)
                x = ddim.step(eps, t, x, eta=0.0).prev_sample
                bar.update(1)
            images.append(x.float().clamp(-1, 1).cpu())
            if capture_h:
                hs.append(torch.stack(captured, dim=0))
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
        unet.train(was_training)
    return images, hs, timesteps


def _unet_forward(unet: torch.nn.Module, x: torch.Tensor, t: int, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    if autocast_dtype is None:
        return unet(x, t).sample
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        return unet(x, t).sample


def ddim_tangent(
    unet: torch.nn.Module,
    scheduler,
    x_T: torch.Tensor,
    v: torch.Tensor,
    num_steps: int,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    codec: Codec | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM from x_T and its derivative along v: (images, J_G v), both (B, C, H, W) float32 on the CPU.
    With a `codec` (a latent model) G ends with its decoder, so the images and the tangent are decoded ones (the
    decoder runs in float32, inside `hspace.autodiff_safe` too; a VQ decoder's quantiser passes the tangent straight
    through, `Codec.decode`).

    One forward-mode pass (`torch.func.jvp`) carries the tangent through every UNet evaluation and DDIM update, so
    the directional derivative of the generator comes without the cancellation of a finite difference: it is what
    PPL's d(G(x), G(x + eps v)) / eps^2 tends to as eps -> 0 once the distance is expanded to second order
    (`isosweep.evaluation.metrics.ppl`). Images are clamped to [-1, 1] as `ddim_sample`'s are, and so is the tangent
    (zero where the clamp is active). Same schedule and timesteps as `ddim_sample`: the images equal its images.
    The UNet runs inside `hspace.autodiff_safe` (math attention, GroupNorm inputs and tangents made contiguous).

    precision: "fp32" (TF32 off: the caller's setting, which the suite keeps off), "tf32" (TF32 on for the duration,
    CUDA only; the same as fp32 on a CPU), "bf16" (the UNet forward in bfloat16: a bfloat16 copy of the UNet, or the
    UNet itself when it is bfloat16 already, with x_t and its tangent cast on the way in; state, tangent and DDIM
    update float32. `torch.autocast` is not used: its casts miss the tangents of forward-mode AD on some ops).
    A derivative has no difference of nearly equal numbers, so its relative error is that of the arithmetic
    (docs/metrics.md, "PPL by forward-mode differentiation", measures it).
    """
    if precision not in TANGENT_PRECISIONS:
        raise ValueError(f"precision must be one of {TANGENT_PRECISIONS}, got {precision!r}")
    if v.shape != x_T.shape:
        raise ValueError(f"v must have x_T's shape {tuple(x_T.shape)}, got {tuple(v.shape)}")
    device = torch.device(device) if device is not None else _unet_device(unet)
    state_dtype = torch.promote_types(_unet_dtype(unet), torch.float32)
    if precision == "bf16":
        unet = bf16_copy(unet)
    unet_dtype = _unet_dtype(unet)
    ddim = ddim_scheduler(scheduler, num_steps)
    timesteps = [int(t) for t in ddim.timesteps]

    def trajectory(x: torch.Tensor) -> torch.Tensor:
        for t in timesteps:
            eps = unet(x.to(unet_dtype), t).sample.to(state_dtype)
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        return (x if codec is None else codec.decode(x, straight_through=True)).clamp(-1, 1)

    was_training = unet.training
    unet.eval()
    images, tangents = [], []
    try:
        # GroupNorm inputs always copied contiguous, tangent included: the detection autodiff_safe uses misses the
        # tangent layouts of a whole UNet on some builds (torch 2.11 on the CPU: "view size is not compatible")
        with (torch.no_grad(), _tf32(precision == "tf32"), autodiff_safe(unet, contiguous_group_norm=True),
              autodiff_safe(codec.module, contiguous_group_norm=True) if codec is not None and codec.module is not None
              else contextlib.nullcontext()):
            for lo in range(0, x_T.shape[0], batch_size):
                x = x_T[lo : lo + batch_size].to(device=device, dtype=state_dtype)
                dx = v[lo : lo + batch_size].to(device=device, dtype=state_dtype)
                img, tan = torch.func.jvp(trajectory, (x,), (dx,))
                images.append(img.float().cpu())
                tangents.append(tan.float().cpu())
    finally:
        unet.train(was_training)
    return torch.cat(images), torch.cat(tangents)


def bf16_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet itself when it is bfloat16, else a bfloat16 copy of it (the original is not touched)."""
    if _unet_dtype(unet) == torch.bfloat16:
        return unet
    return torch.nn.Module.to(copy.deepcopy(unet), torch.bfloat16)  # not ModelMixin.to, which warns about from_pretrained


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions within the block when `enabled`, the caller's setting restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class DDIMSampler:
    """A `Sampler` bound to one UNet and scheduler: `sampler(x_T, num_steps, capture_h=...)`.

    `precision` is `ddim_sample`'s ("fp32" unless the metrics it serves tolerate half precision: not PPL).
    With a `codec` (a latent model) x_T and h are the latent UNet's, and the images are the codec's decoding of
    the sampled latents; `sample_shape` stays the latents' shape, the shape of x_T.
    """

    def __init__(self, unet: torch.nn.Module, scheduler, *, batch_size: int = 64, progress: bool = True,
                 device: torch.device | str | None = None, precision: Precision = "fp32", codec: Codec | None = None) -> None:
        self.unet, self.scheduler, self.codec = unet, scheduler, codec
        self.batch_size, self.progress, self.device = batch_size, progress, device
        self.precision = precision
        self._bf16: torch.nn.Module | None = None  # the bfloat16 copy `tangent` runs with precision "bf16"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return sample_shape(self.unet)

    def __call__(self, x_T: torch.Tensor, num_steps: int, *, capture_h: bool = False) -> SampleOutput:
        out = ddim_sample(self.unet, self.scheduler, x_T, num_steps, batch_size=self.batch_size,
                          capture_h=capture_h, progress=self.progress, device=self.device, precision=self.precision)
        if self.codec is not None:
            out.images = self.codec.decode(out.images)
        return out

    def tangent(self, x_T: torch.Tensor, v: torch.Tensor, num_steps: int, *, precision: str = "fp32"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`ddim_tangent` of this UNet: the images from x_T and their derivative along v (the bfloat16 copy that
        precision "bf16" runs is made once per sampler)."""
        unet = self.unet
        if precision == "bf16":
            if self._bf16 is None:
                self._bf16 = bf16_copy(self.unet)
            unet = self._bf16
        return ddim_tangent(unet, self.scheduler, x_T, v, num_steps, batch_size=self.batch_size, device=self.device,
                            precision=precision, codec=self.codec)
