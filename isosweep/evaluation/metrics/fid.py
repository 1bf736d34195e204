"""Frechet distance between Gaussian fits of feature sets (FID; docs/math.md section 5).

`frechet_distance` is a pure NumPy function; `generated_features` samples a model with deterministic latents
(a `SampleRange`) and embeds the images with a feature extractor (clean-fid's Inception or the domain network, see
`isosweep.evaluation.features.resolver`); `fid_from_features` compares them with reference statistics that the
caller computed and cached (`reference_statistics`). No image files are written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from isosweep.core.progress import progress_bar
from isosweep.core.sampling import initial_noise
from isosweep.evaluation.metrics.samples import SampleRange
from isosweep.files import write_bytes_atomic

__all__ = [
    "frechet_distance",
    "symmetric_sqrt",
    "feature_statistics",
    "generated_features",
    "fid_from_features",
    "low_rank_trace_sqrt",
    "fid_of_counts",
    "reference_statistics",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images (B, C, H, W) in [-1, 1] -> features (B, d)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

    mu (d,), sigma (d, d), both covariances symmetric positive semi-definite. The trace of the square root is
    taken through symmetric matrices only: with A = sigma1^{1/2}, sigma1 sigma2 and A sigma2 A have the same
    eigenvalues, so Tr (sigma1 sigma2)^{1/2} = sum sqrt(eig(A sigma2 A)). Two symmetric eigendecompositions
    replace the general `scipy.linalg.sqrtm` clean-fid uses (the same number to rounding; at d = 2048 several
    times faster, and never complex). Computed in float64.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("Frechet distance: non-finite mean or covariance (a feature was NaN or infinite)")
    diff = mu1 - mu2
    root = symmetric_sqrt(sigma1)
    eig = np.linalg.eigvalsh(root @ sigma2 @ root)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())  # rounding can leave eigenvalues of order -1e-12
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def symmetric_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric positive semi-definite square root of a covariance (d, d), by one eigendecomposition;
    eigenvalues that rounding left slightly negative count as 0."""
    sym = (np.asarray(sigma, np.float64) + np.asarray(sigma, np.float64).T) / 2.0
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (unbiased, as clean-fid's np.cov) of features (N, d), float64."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_features(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of generated features (N, d) against reference statistics: `fid_of_counts` with every row once, so with
    fewer samples than dimensions (a cheap checkpoint FID of 2,000 Inception features of 2,048 dimensions) the trace
    term goes through an N x N matrix, without a d x d eigendecomposition."""
    feats = np.asarray(feats, np.float64)
    ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    if feats.ndim != 2 or len(feats) < 2 or ref_mu.shape != (feats.shape[1],) or ref_sigma.shape != (feats.shape[1],) * 2:
        raise ValueError(f"shape mismatch: features {feats.shape}, reference mu {ref_mu.shape}, sigma {ref_sigma.shape}")
    if not all(np.isfinite(a).all() for a in (feats, ref_mu, ref_sigma)):
        raise ValueError("Frechet distance: non-finite mean or covariance (a feature was NaN or infinite)")
    return float(fid_of_counts(feats, ref_mu, ref_sigma)(np.ones((1, len(feats)), np.int64))[0])


def low_rank_trace_sqrt(gram: np.ndarray) -> float:
    """Tr (R S)^{1/2} for S = B^T B of rank <= N, from the symmetric N x N matrix gram = B R B^T.

    R S = R B^T B and B R B^T have the same non-zero eigenvalues, which are those of a product of two symmetric
    positive semi-definite matrices and so real and non-negative: the trace of the square root is the sum of their
    square roots, found by one N x N symmetric eigendecomposition instead of two d x d ones."""
    sym = (gram + gram.T) / 2.0
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(sym), 0.0, None)).sum())


def fid_of_counts(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """`frechet_distance` of each resample of the generated features (N, d) against fixed reference statistics.

    S_b is the unbiased weighted covariance of the resample (np.cov of the drawn rows), so all-ones counts give the
    FID itself. With N <= d, S_b = B^T B for B = diag(sqrt(c / (n - 1))) (x - mu_b), and Tr (S_b R)^{1/2} is
    `low_rank_trace_sqrt` of B R B^T, which is the N x N matrix x R x^T = G (computed once) centred on mu_b:
    a resample costs an N x N eigendecomposition. With N > d, A = ref_sigma^{1/2} (symmetric, computed once:
    `symmetric_sqrt`) and Tr (S_b R)^{1/2} = Tr (A S_b A)^{1/2}: one d x d symmetric eigendecomposition.
    """
    x = np.asarray(feats, np.float64)
    mean = x.mean(axis=0)
    x = x - mean  # every statistic below is invariant to a shift of x; centring keeps G's entries small
    mu_r, sigma_r = np.asarray(ref_mu, np.float64) - mean, np.asarray(ref_sigma, np.float64)
    tr_r = float(np.trace(sigma_r))
    low_rank = len(x) <= x.shape[1]
    if low_rank:
        gram = x @ sigma_r @ x.T  # (N, N)
        norms = (x * x).sum(axis=1)
    else:
        root = symmetric_sqrt(sigma_r)

    def stat(counts: np.ndarray) -> np.ndarray:
        out = np.empty(len(counts))
        for i, c in enumerate(counts.astype(np.float64)):
            n = c.sum()
            mu = c @ x / n
            diff = mu - mu_r
            if low_rank:
                u = gram @ c / n  # x R mu
                centred = gram - u[:, None] - u[None, :] + c @ u / n  # (x - mu) R (x - mu)^T
                w = np.sqrt(c / (n - 1.0))
                tr_s = float((c @ norms - n * (mu @ mu)) / (n - 1.0))
                tr_sqrt = low_rank_trace_sqrt(w[:, None] * centred * w[None, :])
            else:
                centred = x - mu
                cov = (centred * c[:, None]).T @ centred / (n - 1.0)
                tr_s = float(np.trace(cov))
                tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov @ root), 0.0, None)).sum())
            out[i] = diff @ diff + tr_s + tr_r - 2.0 * tr_sqrt
        return out

    return stat


@torch.inference_mode()
def generated_features(samples: SampleRange, features: FeatureFn, *, keep_images: int = 0) -> tuple[np.ndarray, torch.Tensor | None]:
    """Features (n, d) of the generated samples of `samples` (latents: stream 0), batch by batch.

    Shards over index ranges concatenate to the unsharded result. The first `keep_images` images (of this range)
    are returned too, for a grid.
    """
    out, kept = [], []
    for lo, n in samples.batches():
        imgs = samples.sampler(initial_noise(n, samples.shape, samples.seed, start=lo), samples.ddim_steps).images
        out.append(features(imgs).float().cpu().numpy())
        if sum(k.shape[0] for k in kept) < keep_images:
            kept.append(imgs)
    feats = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    images = torch.cat(kept)[:keep_images] if kept else None
    return feats, images


def _stats_key(dataset_key: dict, backbone: str) -> str:
    blob = json.dumps({"dataset": dataset_key, "backbone": backbone}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def reference_statistics(
    images: Iterable[torch.Tensor],
    features: FeatureFn,
    *,
    backbone: str,
    dataset_key: dict,
    cache_dir: str | os.PathLike,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features of a dataset's images, cached in cache_dir/fid_stats.

    images: an iterable of (B, C, H, W) batches in [-1, 1] (only consumed on a cache miss).
    The cache file is keyed by the dataset description `dataset_key` (kind, path or seed, resolution,
    count, for an image folder the files' fingerprint, ...) and the backbone name, so statistics of different
    feature networks, or of images replaced under the same path, never mix.
    """
    folder = Path(cache_dir).expanduser() / "fid_stats"
    path = folder / f"{backbone}-{_stats_key(dataset_key, backbone)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:  # a cache file never runs code when read
            return z["mu"], z["sigma"]
    feats = [features(b).float().cpu().numpy() for b in progress_bar(images, desc="reference features", disable=not progress, leave=False)]
    mu, sigma = feature_statistics(np.concatenate(feats))
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, key=json.dumps({"dataset": dataset_key, "backbone": backbone}, sort_keys=True))
    write_bytes_atomic(path, buffer.getvalue())  # concurrent trials never read a half-written file
    return mu, sigma

