"""Bootstrap intervals of the evaluation metrics: how sure a PPL, mRTL, MCN, VoR or screening FID is (docs/metrics.md, "Intervals").

Every interval is a percentile bootstrap over the metric's own units (PPL pairs, mRTL pairs, Jacobian samples):
`resamples` draws of n units with replacement, the metric recomputed on each, and the (1 - level)/2 and
(1 + level)/2 quantiles of those values. A resample is represented by its counts (how often each unit was
drawn, shape (B, n)), so every statistic is a few array operations over a chunk of resamples, never a Python
loop over resamples. The draws come from a NumPy generator seeded by (seed, the metric's name): the same
values give the same interval on every machine, and two trials with the same evaluation.seed resample the
same unit indices.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

from isosweep.evaluation.metrics.fid import fid_of_counts
from isosweep.evaluation.metrics.ppl import filtered_mean

__all__ = [
    "bootstrap_values",
    "bootstrap_interval",
    "mean_of_counts",
    "filtered_mean_of_counts",
    "vor_of_counts",
    "ppl_summary",
    "ppl_interval_tight",
    "mean_interval",
    "vor_interval",
    "fid_of_counts",
    "fid_interval",
]

Statistic = Callable[[np.ndarray], np.ndarray]  # counts (B, n) -> the statistic of each resample (B,)

_CHUNK_ELEMENTS = 2**21  # counts per chunk of resamples (B_chunk * n): about 16 MB of int64
_BOOTSTRAP_STREAM = 7  # beside initial_noise's streams 0-6, so no draw is shared with the latents


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _BOOTSTRAP_STREAM, zlib.crc32(name.encode())]))


def bootstrap_values(n: int, statistic: Statistic, *, resamples: int, seed: int, name: str) -> np.ndarray:
    """The finite values of `statistic` over `resamples` resamples of n units with replacement.

    statistic maps the counts of a chunk of resamples, (B, n) int, to the statistic of each, (B,). Seeded by
    (seed, name); resamples are drawn in chunks of a size fixed by n, so the answer depends on nothing else.
    """
    if n < 1 or resamples < 1:
        return np.zeros(0)
    rng = _rng(seed, name)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    stats = []
    for lo in range(0, resamples, chunk):
        b = min(chunk, resamples - lo)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        stats.append(np.asarray(statistic(counts), np.float64))
    values = np.concatenate(stats)
    return values[np.isfinite(values)]


def bootstrap_interval(n: int, statistic: Statistic, *, resamples: int, level: float, seed: int, name: str) -> tuple[float, float]:
    """(lo, hi): the percentile interval of `statistic` over `resamples` resamples (`bootstrap_values`)."""
    values = bootstrap_values(n, statistic, resamples=resamples, seed=seed, name=name)
    if not len(values):
        return float("nan"), float("nan")
    lo_q, hi_q = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo_q), float(hi_q)


def mean_of_counts(values: np.ndarray) -> Statistic:
    """The mean of `values` (n,) under each resample's counts."""
    v = np.asarray(values, np.float64)
    return lambda counts: counts @ v / counts.sum(axis=1)


def filtered_mean_of_counts(values: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> Statistic:
    """`ppl.filtered_mean` of each resample: the mean of its values between its lo-th percentile (method
    'lower') and its hi-th (method 'higher'), inclusive. `values` (n,) in any order.

    With the values sorted, the resample's k-th smallest value (0-based) is values[j], j the first index whose
    cumulative count exceeds k; numpy's 'lower' and 'higher' percentiles are the floor and ceil of
    q/100 * (n - 1) in that order.
    """
    raw = np.asarray(values, np.float64)
    order = np.argsort(raw, kind="stable")
    v, n = raw[order], len(raw)
    k_lo, k_hi = int(np.floor(lo / 100.0 * (n - 1))), int(np.ceil(hi / 100.0 * (n - 1)))

    def stat(counts: np.ndarray) -> np.ndarray:
        c = counts[:, order]  # column i of counts is unit i (values[i]); here in sorted order
        cum = np.cumsum(c, axis=1)
        a = v[(cum <= k_lo).sum(axis=1)]
        b = v[(cum <= k_hi).sum(axis=1)]
        keep = c * ((v >= a[:, None]) & (v <= b[:, None]))
        return keep @ v / keep.sum(axis=1)

    return stat


def vor_of_counts(svals: np.ndarray, norm: str = "global_mean") -> Statistic:
    """`jacobian.vor` of each resample of the samples: svals (N, k), largest first.

    sum_i Var_w[s_i / c] = sum_i (E_w[s_i^2] - E_w[s_i]^2) / c^2, with E_w the resample's weighted mean over
    samples and c = E_w[mean_i s_i] ('global_mean') or 1 ('paper'): two matrix products per chunk.
    """
    s = np.asarray(svals, np.float64)
    if norm not in ("global_mean", "paper"):
        raise ValueError(f"unknown vor_norm {norm!r}; use global_mean or paper")

    def stat(counts: np.ndarray) -> np.ndarray:
        w = counts / counts.sum(axis=1, keepdims=True)
        m1, m2 = w @ s, w @ (s * s)  # (B, k)
        var = np.clip(m2 - m1 * m1, 0.0, None).sum(axis=1)
        return var / m1.mean(axis=1) ** 2 if norm == "global_mean" else var

    return stat


def ppl_summary(values: np.ndarray, *, resamples: int, level: float, seed: int) -> dict[str, float]:
    """PPL from its per-pair values d_i: the filtered mean (`ppl`, as `ppl.filtered_mean`) with its bootstrap
    interval (`ppl_lo`, `ppl_hi`, the filter re-applied to every resample), and the median, 90th and 99th
    percentiles of the unfiltered d_i (`ppl_median`, `ppl_p90`, `ppl_p99`, numpy's linear interpolation)."""
    d = np.asarray(values, np.float64)
    out = {"ppl": filtered_mean(d)}
    out.update(zip(("ppl_median", "ppl_p90", "ppl_p99"), (float(q) for q in np.percentile(d, [50, 90, 99]))))
    if resamples:
        out["ppl_lo"], out["ppl_hi"] = bootstrap_interval(len(d), filtered_mean_of_counts(d), resamples=resamples,
                                                          level=level, seed=seed, name="ppl")
    return out


SEQUENTIAL_RESAMPLES = 200  # bootstrap resamples of sequential PPL's look after each round (cheap, and steady enough)


def ppl_interval_tight(values: np.ndarray, *, stop_width: float, level: float, seed: int) -> bool:
    """Sequential PPL's stopping rule (`evaluation.ppl.stop_width`): the bootstrap interval of the pairs so far
    (SEQUENTIAL_RESAMPLES resamples) is at most stop_width x PPL wide."""
    summary = ppl_summary(values, resamples=SEQUENTIAL_RESAMPLES, level=level, seed=seed)
    return bool(summary.get("ppl_hi", np.inf) - summary.get("ppl_lo", 0.0) <= stop_width * abs(summary["ppl"]))


def mean_interval(name: str, values: np.ndarray, *, resamples: int, level: float, seed: int) -> dict[str, float]:
    """{<name>_lo, <name>_hi}: the bootstrap interval of the mean of per-unit values (mRTL pairs, MCN samples);
    {} without resamples."""
    v = np.asarray(values, np.float64)
    if not resamples:
        return {}
    lo, hi = bootstrap_interval(len(v), mean_of_counts(v), resamples=resamples, level=level, seed=seed, name=name)
    return {f"{name}_lo": lo, f"{name}_hi": hi}


def vor_interval(name: str, svals: np.ndarray, norm: str, *, resamples: int, level: float, seed: int) -> dict[str, float]:
    """{<name>_lo, <name>_hi}: the bootstrap interval of VoR over its samples (rows of svals); {} without resamples."""
    s = np.asarray(svals, np.float64)
    if not resamples:
        return {}
    lo, hi = bootstrap_interval(len(s), vor_of_counts(s, norm), resamples=resamples, level=level, seed=seed, name=name)
    return {f"{name}_lo": lo, f"{name}_hi": hi}


def fid_interval(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *, resamples: int, level: float,
                 seed: int) -> dict[str, float]:
    """{fid_lo, fid_hi}: how far FID moves with the generated images drawn (the reference statistics held fixed, as
    every trial shares them); {} without resamples. Used at screening fidelity, where it decides which trials are
    evaluated in full (docs/metrics.md, "Screening").

    Re-centred on the estimate: [fid + (q_lo - m), fid + (q_hi - m)], q the bootstrap quantiles and m their median.
    A resample repeats images, which lowers its diversity and raises its FID, so the plain percentile interval sits
    above the estimate (at 64 samples of 256-d features it can lie wholly above it); the spread is what compares
    trials measured at the same size."""
    x = np.asarray(feats, np.float64)
    if not resamples:
        return {}
    statistic = fid_of_counts(x, ref_mu, ref_sigma)
    values = bootstrap_values(len(x), statistic, resamples=resamples, seed=seed, name="fid")
    if not len(values):
        return {"fid_lo": float("nan"), "fid_hi": float("nan")}
    estimate = float(statistic(np.ones((1, len(x)), np.int64))[0])
    lo_q, mid, hi_q = np.quantile(values, [(1.0 - level) / 2.0, 0.5, (1.0 + level) / 2.0])
    return {"fid_lo": estimate + float(lo_q - mid), "fid_hi": estimate + float(hi_q - mid)}
