"""Deterministic DDIM sampling (eta = 0) from a diffusers UNet2DModel, in batches (MATH.md section 5).

Sampling is the inner loop of every metric, so it is batched, runs under `torch.inference_mode`, and can
capture the bottleneck h (the output of `unet.mid_block`) at every step for mRTL. Initial noise is drawn
per sample index from its own generator: sample i's noise depends only on (seed, stream, i), so a
sharded evaluation draws exactly the latents a single process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

__all__ = ["SampleOutput", "Sampler", "DDIMSampler", "ddim_sample", "initial_noise", "index_generator"]


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


def _unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


def _unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


@torch.inference_mode()
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
) -> SampleOutput:
    """Run deterministic DDIM (eta = 0) from x_T: (B, C, H, W) -> images (B, C, H, W) in [-1, 1] on the CPU.

    `scheduler` is the model's training scheduler (any diffusers scheduler with a DDPM-style config); a
    fresh `DDIMScheduler.from_config(scheduler.config)` is built, as diffusers' DDIMPipeline does, so
    the caller's scheduler is not modified. With `capture_h`, the output of `unet.mid_block` at each step
    is returned as h (num_steps, B, *h_shape) on the CPU.
    """
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    timesteps = [int(t) for t in ddim.timesteps]
    device = torch.device(device) if device is not None else _unet_device(unet)
    dtype = _unet_dtype(unet)
    was_training = unet.training
    unet.eval()

    captured: list[torch.Tensor] = []
    handle = None
    if capture_h:
        handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu()))

    images, hs = [], []
    n = x_T.shape[0]
    total = -(-n // batch_size) * len(timesteps)
    bar = tqdm(total=total, desc=f"DDIM {num_steps} steps", disable=not progress, leave=False)
    try:
        for lo in range(0, n, batch_size):
            x = x_T[lo : lo + batch_size].to(device=device, dtype=dtype)
            captured.clear()
            for t in timesteps:
                eps = unet(x, t).sample
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
    h = torch.cat(hs, dim=1) if capture_h else None
    return SampleOutput(images=torch.cat(images, dim=0), h=h, timesteps=timesteps)


class DDIMSampler:
    """A `Sampler` bound to one UNet and scheduler: `sampler(x_T, num_steps, capture_h=...)`."""

    def __init__(self, unet: torch.nn.Module, scheduler, *, batch_size: int = 64, progress: bool = True,
                 device: torch.device | str | None = None) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.batch_size, self.progress, self.device = batch_size, progress, device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return sample_shape(self.unet)

    def __call__(self, x_T: torch.Tensor, num_steps: int, *, capture_h: bool = False) -> SampleOutput:
        return ddim_sample(self.unet, self.scheduler, x_T, num_steps, batch_size=self.batch_size,
                           capture_h=capture_h, progress=self.progress, device=self.device)

