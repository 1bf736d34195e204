"""Perceptual path length in X (docs/math.md section 5; Karras et al. 2019 with slerp, as for Gaussian z).

Two ways to a pair's value (`evaluation.ppl.method`, docs/metrics.md "PPL by forward-mode differentiation"):
- "finite_difference" (StyleGAN's): d(G(slerp(s)), G(slerp(s + eps))) / eps^2 from two DDIM decodes;
- "jvp": the limit of that ratio as eps -> 0. With v = d slerp / ds and u = J_G v (one DDIM decode carrying its
  tangent, `ddim_tangent`), d(a, a + eps u) / eps^2 -> (1/2) d^2/dtau^2 d(a, a + tau u) at tau = 0, taken by
  forward-over-forward differentiation of the distance (`tangent_quadratic`). No difference of nearly equal
  images is formed, so it tolerates TF32 and bf16, which the finite difference does not.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from isosweep.core.sampling import index_generator, initial_noise
from isosweep.evaluation.metrics.paths import slerp, slerp_tangent
from isosweep.evaluation.metrics.samples import SampleRange

__all__ = ["PPL_METHODS", "ppl_pairs", "ppl_distances", "tangent_quadratic", "sequential_pairs", "filtered_mean",
           "perceptual_path_length"]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # two (B, C, H, W) in [-1, 1] -> (B,)
PPL_METHODS = ("finite_difference", "jvp")

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


def ppl_distances(samples: SampleRange, distance: Distance, *, eps: float, method: str = "finite_difference",
                  precision: str = "fp32") -> np.ndarray:
    """d_i for the pairs of `samples`: (n,) float64.

    "finite_difference": distance(G(slerp(z0, z1; s)), G(slerp(z0, z1; s + eps))) / eps^2, both ends decoded in the
    same batch with deterministic DDIM (eta = 0); `precision` must be "fp32".
    "jvp": its eps -> 0 limit, `tangent_quadratic(distance, G(slerp(s)), J_G slerp'(s))`, one decode per pair in
    `precision` ("fp32", "tf32", "bf16"; `ddim_tangent`); `eps` is not used. `samples.sampler` must offer
    `tangent` (`DDIMSampler` does) and `distance` must admit forward-mode differentiation (no inference mode).
    """
    if method not in PPL_METHODS:
        raise ValueError(f"method must be one of {PPL_METHODS}, got {method!r}")
    if method == "finite_difference" and precision != "fp32":
        raise ValueError(f"PPL by finite difference needs precision 'fp32' (got {precision!r}): the difference of two "
                         "decodes eps apart is rounding noise in reduced precision; use method 'jvp' for tf32 or bf16")
    out = []
    for lo, n in samples.batches():
        z0, z1, s = ppl_pairs(n, samples.shape, samples.seed, start=lo)
        if method == "jvp":
            images, tangents = samples.sampler.tangent(slerp(z0, z1, s), slerp_tangent(z0, z1, s), samples.ddim_steps,
                                                       precision=precision)
            d = tangent_quadratic(distance, images, tangents).double().cpu().reshape(-1)
        else:
            d = _finite_difference(samples, distance, z0, z1, s, eps)
        out.append(d.numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.inference_mode()
def _finite_difference(samples: SampleRange, distance: Distance, z0: torch.Tensor, z1: torch.Tensor, s: torch.Tensor,
                       eps: float) -> torch.Tensor:
    n = z0.shape[0]
    imgs = samples.sampler(torch.cat([slerp(z0, z1, s), slerp(z0, z1, s + eps)]), samples.ddim_steps).images
    return distance(imgs[:n], imgs[n:]).double().cpu().reshape(-1) / eps**2


def tangent_quadratic(distance: Distance, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """lim_{eps -> 0} distance(a, a + eps u) / eps^2 per sample: a, u (B, ...) -> (B,).

    For a distance that is smooth and zero, with zero first derivative, at b = a (LPIPS and the domain distance
    are weighted sums of squared differences of normalised features), that limit is (1/2) g''(0) with
    g(tau) = distance(a, a + tau u): computed by forward-mode over forward-mode differentiation in tau (one tau per
    sample), exactly at tau = 0, so no difference of nearly equal features is formed.
    """
    ones = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
    view = (-1, *([1] * (a.ndim - 1)))

    def g(tau: torch.Tensor) -> torch.Tensor:
        return distance(a, a + tau.reshape(view) * u).reshape(-1)

    def dg(tau: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(g, (tau,), (ones,))[1]

    with torch.no_grad():
        return torch.func.jvp(dg, (torch.zeros_like(ones),), (ones,))[1] / 2


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


def perceptual_path_length(samples: SampleRange, distance: Distance, *, eps: float = 1e-4,
                           method: str = "finite_difference", precision: str = "fp32") -> float:
    """PPL = mean over pairs (1st-99th percentile) of distance / eps^2 between slerp(s) and slerp(s + eps)
    (or its eps -> 0 limit, method "jvp")."""
    return filtered_mean(ppl_distances(samples, distance, eps=eps, method=method, precision=precision))
