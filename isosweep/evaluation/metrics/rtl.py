"""Relative trajectory length in H along DDIM trajectories of slerp paths (mRTL; docs/math.md section 5)."""

from __future__ import annotations

import torch

from isosweep.core.sampling import initial_noise
from isosweep.evaluation.metrics.paths import relative_trajectory_length, slerp
from isosweep.evaluation.metrics.samples import SampleRange

__all__ = ["pair_latents", "rtl_per_pair", "summarize_rtl", "pair_mrtl"]


def pair_latents(n: int, shape: tuple[int, ...], seed: int, *, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ends (x, x') of interpolation pairs start..start+n-1: each (n, *shape), from streams 1 and 2
    of `seed` (stream 0 is the FID samples), so pair i is the same in every shard and every metric."""
    return initial_noise(n, shape, seed, start=start, stream=1), initial_noise(n, shape, seed, start=start, stream=2)


@torch.inference_mode()
def rtl_per_pair(samples: SampleRange, *, num_points: int) -> torch.Tensor:
    """RTL(t) of each pair of `samples`: (n_pairs, ddim_steps), float64.

    Pair i has K+1 = num_points+1 points slerp(x_i, x'_i; k/K); every point runs its own DDIM trajectory and
    at each step the bottleneck h_t of all points gives relative_trajectory_length over k.
    """
    K = num_points
    s = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)
    rows = []
    for lo, n in samples.batches():
        a, b = pair_latents(n, samples.shape, samples.seed, start=lo)
        # points ordered (pair, k): (n*(K+1), *shape)
        pts = torch.stack([slerp(a, b, s[k].expand(n)) for k in range(K + 1)], dim=1).flatten(0, 1)
        h = samples.sampler(pts, samples.ddim_steps, capture_h=True).h  # (steps, n*(K+1), ...)
        steps = h.shape[0]
        h = h.reshape(steps, n, K + 1, -1).permute(0, 2, 1, 3)  # (steps, K+1, n, m)
        rows.append(torch.stack([relative_trajectory_length(h[t]) for t in range(steps)], dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, samples.ddim_steps), dtype=torch.float64)


def summarize_rtl(per_pair: torch.Tensor) -> tuple[float, list[float]]:
    """(n_pairs, steps) per-pair RTL -> (mRTL, RTL(t) curve): RTL(t) is the mean over pairs (one value per DDIM step,
    high noise first), mRTL = mean_t RTL(t)."""
    curve = per_pair.mean(dim=0)
    return float(curve.mean()), [float(v) for v in curve]


def pair_mrtl(per_pair: torch.Tensor) -> torch.Tensor:
    """(n_pairs, steps) per-pair RTL -> (n_pairs,) each pair's mean over t: mRTL is their mean (every pair has
    the same steps), so these are the units its bootstrap interval resamples."""
    return per_pair.double().mean(dim=1)
