"""Bootstrap intervals of PPL, mRTL, MCN and VoR: known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isosweep.evaluation.metrics.confidence import (
    bootstrap_interval,
    filtered_mean_of_counts,
    mean_interval,
    mean_of_counts,
    ppl_summary,
    vor_interval,
    vor_of_counts,
)
from isosweep.evaluation.metrics.jacobian import vor
from isosweep.evaluation.metrics.ppl import filtered_mean

BOOT = dict(resamples=1000, level=0.95)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.stack([np.bincount(i, minlength=n) for i in idx])


@pytest.mark.parametrize("n", [5, 100, 101, 1000])
def test_statistics_of_counts_equal_the_metric_on_the_expanded_resample(n):
    rng = np.random.default_rng(n)
    v = rng.lognormal(size=n)  # heavy right tail, as PPL's per-pair values
    assert filtered_mean_of_counts(v)(np.ones((1, n), int))[0] == pytest.approx(filtered_mean(v), rel=1e-12)
    idx = rng.integers(0, n, size=(6, n))
    assert np.allclose(filtered_mean_of_counts(v)(_counts(idx, n)), [filtered_mean(v[i]) for i in idx], rtol=1e-12)
    assert np.allclose(mean_of_counts(v)(_counts(idx, n)), [v[i].mean() for i in idx], rtol=1e-12)
    s = rng.lognormal(size=(n, 4))
    for norm in ("global_mean", "paper"):
        assert vor_of_counts(s, norm)(np.ones((1, n), int))[0] == pytest.approx(vor(torch.tensor(s), norm), rel=1e-9)
        assert np.allclose(vor_of_counts(s, norm)(_counts(idx, n)), [vor(torch.tensor(s[i]), norm) for i in idx], rtol=1e-9)


def test_the_interval_covers_the_true_mean_in_most_seeds_and_shrinks_with_n():
    """N(3, 1) data: the 95% interval of the mean covers 3 in about 95% of data sets (here >= 34 of 40), and
    that of the filtered mean (symmetric distribution: its true value is also 3) likewise; 16x the data gives
    about a quarter of the width."""
    covered, covered_filtered, widths = 0, 0, {}
    for seed in range(40):
        x = np.random.default_rng(seed).normal(3.0, 1.0, size=200)
        lo, hi = bootstrap_interval(len(x), mean_of_counts(x), seed=seed, name="t", **BOOT)
        covered += lo <= 3.0 <= hi
        lo, hi = bootstrap_interval(len(x), filtered_mean_of_counts(x), seed=seed, name="t", **BOOT)
        covered_filtered += lo <= 3.0 <= hi
    assert covered >= 34 and covered_filtered >= 34, (covered, covered_filtered)
    for n in (100, 1600):
        x = np.random.default_rng(n).normal(3.0, 1.0, size=n)
        lo, hi = bootstrap_interval(n, mean_of_counts(x), seed=0, name="t", **BOOT)
        widths[n] = hi - lo
        assert widths[n] == pytest.approx(2 * 1.96 / np.sqrt(n), rel=0.2)  # the normal theory width
    assert 2.5 < widths[100] / widths[1600] < 6.0


def test_the_interval_is_seeded_and_its_draws_are_named():
    x = np.random.default_rng(0).lognormal(size=300)
    a = mean_interval("mcn", x, seed=5, **BOOT)
    assert a == mean_interval("mcn", x, seed=5, **BOOT)  # deterministic
    assert a != mean_interval("mcn", x, seed=6, **BOOT)
    assert set(a) == {"mcn_lo", "mcn_hi"} and a["mcn_lo"] < x.mean() < a["mcn_hi"]
    b = mean_interval("mcn_t100", x, seed=5, **BOOT)  # another metric: its own draws
    assert b != {"mcn_t100_lo": a["mcn_lo"], "mcn_t100_hi": a["mcn_hi"]}
    assert mean_interval("mcn", x, seed=5, resamples=0, level=0.95) == {}


def test_ppl_summary_point_estimate_quantiles_and_interval():
    d = np.random.default_rng(1).lognormal(size=2000)
    out = ppl_summary(d, seed=0, **BOOT)
    assert out["ppl"] == filtered_mean(d)
    assert out["ppl_median"] == pytest.approx(np.median(d)) and out["ppl_p90"] == pytest.approx(np.percentile(d, 90))
    assert out["ppl_median"] < out["ppl_p90"] < out["ppl_p99"]
    assert out["ppl_lo"] < out["ppl"] < out["ppl_hi"]
    assert "ppl_lo" not in ppl_summary(d, seed=0, resamples=0, level=0.95)


def test_vor_interval_zero_for_a_scaled_isometry_and_positive_otherwise():
    flat = np.full((20, 5), 2.5)
    assert vor_interval("vor", flat, "global_mean", seed=0, **BOOT) == {"vor_lo": 0.0, "vor_hi": 0.0}
    s = np.random.default_rng(2).lognormal(size=(50, 5))
    out = vor_interval("vor", s, "global_mean", seed=0, **BOOT)
    assert 0 < out["vor_lo"] < vor(torch.tensor(s)) < out["vor_hi"]
    scaled = vor_interval("vor", 10 * s, "global_mean", seed=0, **BOOT)
    assert scaled == pytest.approx(out, rel=1e-9)  # scale-free
    paper = vor_interval("vor", 10 * s, "paper", seed=0, **BOOT)
    assert paper["vor_hi"] == pytest.approx(100 * vor_interval("vor", s, "paper", seed=0, **BOOT)["vor_hi"], rel=1e-9)


def test_vor_normalisations():
    """global_mean is scale-free; paper (Eq. 11 on raw singular values) scales with |h|^2; others are refused."""
    s = torch.tensor(np.random.default_rng(3).lognormal(size=(30, 4)))
    assert vor(10 * s) == pytest.approx(vor(s), rel=1e-12)
    assert vor(10 * s, "paper") == pytest.approx(100 * vor(s, "paper"), rel=1e-12)
    assert vor(s, "paper") == pytest.approx(float(s.var(dim=0, unbiased=False).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="vor_norm"):
        vor(s, "per_sample")
