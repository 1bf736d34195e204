"""Perceptual path length in X (docs/math.md section 5; Karras et al. 2019 with slerp, as for Gaussian z)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from isosweep.core.sampling import index_generator, initial_noise
from isosweep.evaluation.metrics.paths import slerp
from isosweep.evaluation.metrics.samples import SampleRange

__all__ = ["ppl_pairs", "ppl_distances", "sequential_pairs", "filtered_mean", "perceptual_path_length"]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # two (B, C, H, W) in [-1, 1] -> (B,)

# initial_noise streams: 0 = FID/LS samples, 1-2 = mRTL pairs, 3-4 = PPL pair ends, 5 = PPL positions
_STREAM_A, _STREAM_B, _STREAM_S = 3, 4, 5


def ppl_pairs(n: int, shape: tuple[int, ...], seed: int, *, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair ends z0, z1 (n, *shape) and positions s (n,) ~ U(0, 1) for pairs start..start+n-1; pair i depends
    only on (seed, i)."""
    z0 = initial_noise(n, shape, seed, start=start, stream=_STREAM_A)
    z1 = initial_noise(n, shape, seed, start=start, stream=_STREAM_B)
    s = torch.stack([torch.rand((), generator=index_generator(seed, start + k, _STREAM_S), dtype=torch.float64)
                     for k in range(n)]) if n else torch.zeros(0, dtype=torch.float64)
    return z0, z1, s


@torch.inference_mode()
def ppl_distances(samples: SampleRange, distance: Distance, *, eps: float) -> np.ndarray:
    """d_i = distance(G(slerp(z0, z1; s)), G(slerp(z0, z1; s + eps))) / eps^2 for the pairs of `samples`: (n,) float64.

    Both ends of a pair are decoded in the same batch with deterministic DDIM (eta = 0)."""
    out = []
    for lo, n in samples.batches():
        z0, z1, s = ppl_pairs(n, samples.shape, samples.seed, start=lo)
        xa, xb = slerp(z0, z1, s), slerp(z0, z1, s + eps)
        imgs = samples.sampler(torch.cat([xa, xb]), samples.ddim_steps).images
        d = distance(imgs[:n], imgs[n:]).double().cpu().reshape(-1) / eps**2
        out.append(d.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sequential_pairs(compute: Callable[[int, int], np.ndarray], gather: Callable[[np.ndarray], list[np.ndarray]], *,
                     num_samples: int, round_pairs: int, rank: int, world_size: int,
                     enough: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Per-pair values of pairs 0, 1, ... in rounds of `round_pairs`, stopping after the first round whose pairs so
    far are `enough` (sequential estimation), or at num_samples.

    compute(lo, hi): this rank's values of pairs lo..hi-1; each round's pairs are split over the ranks in
    contiguous ranges. gather(values): every rank's values in rank order (a collective; [values] on one process).
    After each round every rank holds all pairs so far, in pair order, so `enough` decides the same on every
    rank. Pair i depends only on (seed, i): stopping after n pairs gives exactly the first n pairs' values.
    """
    done = np.zeros(0)
    for lo in range(0, num_samples, round_pairs):
        hi = min(lo + round_pairs, num_samples)
        base, extra = divmod(hi - lo, world_size)
        a = lo + rank * base + min(rank, extra)
        b = a + base + (1 if rank < extra else 0)
        done = np.concatenate([done, *gather(compute(a, b))])
        if hi < num_samples and enough(done):
            break
    return done


def filtered_mean(values: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> float:
    """Mean of the values between the lo-th ('lower') and hi-th ('higher') percentiles, inclusive, as
    StyleGAN's PPL does."""
    values = np.asarray(values, np.float64)
    a = np.percentile(values, lo, method="lower")
    b = np.percentile(values, hi, method="higher")
    return float(values[(values >= a) & (values <= b)].mean())


def perceptual_path_length(samples: SampleRange, distance: Distance, *, eps: float = 1e-4) -> float:
    """PPL = mean over pairs (1st-99th percentile) of distance / eps^2 between slerp(s) and slerp(s + eps)."""
    return filtered_mean(ppl_distances(samples, distance, eps=eps))
