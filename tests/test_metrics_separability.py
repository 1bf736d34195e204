"""Linear separability scored on held-out samples: known answers on small synthetic problems.

LS = exp(sum_i H(Y_i | X_i)), entropies in nats: 1 when a hyperplane fitted on one part of the kept samples
predicts every attribute on the other part, 2 per balanced binary attribute it cannot predict (k per
uniform k-class one). Every problem here has 64-256 dimensions and a few hundred samples.
"""

from __future__ import annotations

import itertools
import typing

import numpy as np
import pytest
import torch

from isosweep.core.names import LS_SPACES
from isosweep.evaluation.metrics.samples import SampleRange
from isosweep.evaluation.metrics.separability import classify_samples, heldout_split, linear_separability, ls_max, ls_name, ls_scores
from isosweep.spec import RESULT_METRICS, EvaluationSpec, LsSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(seed: int, n: int = 800, d: int = 64, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents z (n, d), labels sign(z w_i) (n, k) for unit w_i, and the margin |z w_i| as the confidence."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    w = rng.normal(size=(d, k))
    w /= np.linalg.norm(w, axis=0)
    m = z @ w
    return z, (m > 0).astype(int), np.abs(m)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_linear_in_the_latents_give_ls_near_one(seed):
    """Three attributes, each the side of a hyperplane; keeping the most confident half gives them a margin,
    so the SVM fitted on 200 samples in 64 dims predicts the 200 it never saw (at most a stray error)."""
    z, y, conf = linear_problem(seed)
    assert 1.0 <= linear_separability(z, y, confidence=conf, keep=400, seed=seed) < 1.1
    assert 1.0 <= linear_separability(z, y, "rbf", confidence=conf, keep=400, seed=seed) < 1.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_labels_give_two_per_binary_attribute(seed):
    """Labels independent of the latents: H(Y|X) = H(Y) = log 2 each, so LS = 2^k (here 2^3 = 8)."""
    z, _, conf = linear_problem(seed)
    y = np.random.default_rng(100 + seed).integers(0, 2, size=(len(z), 3))
    assert linear_separability(z, y, seed=seed) == pytest.approx(8.0, rel=0.05)
    assert linear_separability(z, y, confidence=conf, keep=400, seed=seed) == pytest.approx(8.0, rel=0.05)
    assert linear_separability(z, y, "rbf", seed=seed) == pytest.approx(8.0, rel=0.05)


def test_random_multiclass_attribute_gives_its_number_of_classes():
    """A uniform 5-class label (the shapes positions) independent of the latents: LS = 5."""
    z, _, _ = linear_problem(3)
    y = np.random.default_rng(7).integers(0, 5, size=(len(z), 1))
    assert linear_separability(z, y, seed=3) == pytest.approx(5.0, rel=0.05)


def test_ls_counts_only_the_attributes_the_latents_do_not_predict():
    """Two linear and two random binary attributes: LS = 1 * 1 * 2 * 2 = 4, so it ranks models by how many
    attributes their latents separate."""
    z, y, conf = linear_problem(4, k=2)
    rnd = np.random.default_rng(8).integers(0, 2, size=(len(z), 2))
    labels = np.concatenate([y, rnd], axis=1)
    conf = np.concatenate([conf, np.ones_like(conf)], axis=1)
    assert linear_separability(z, labels, confidence=conf, keep=400, seed=4) == pytest.approx(4.0, rel=0.08)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_sample_scoring_calls_random_labels_separable_and_heldout_does_not(seed):
    """The bug this guards: 200 samples in 256 dimensions, random labels. Fitting and scoring the same samples
    (the old LS, `heldout=0`) separates any labelling: LS = 1. Held out, LS = 2^2 = 4."""
    rng = np.random.default_rng(seed)
    z, y = rng.normal(size=(200, 256)), rng.integers(0, 2, size=(200, 2))
    assert linear_separability(z, y, heldout=0.0, seed=seed) == pytest.approx(1.0, abs=1e-9)
    assert linear_separability(z, y, seed=seed) == pytest.approx(4.0, rel=0.06)
    assert linear_separability(z, y, "rbf", seed=seed) == pytest.approx(4.0, rel=0.06)


def test_ls_max_bounds_ls_and_measures_attribute_diversity():
    """ls_max = exp(sum_i H(Y_i)) on the held-out samples: LS of a prediction that ignores the latents. Balanced
    binary labels give 2^k whether or not the latents predict them; LS <= ls_max; less diverse labels (90/10)
    lower both, so LS alone cannot tell "more separable" from "less diverse"."""
    z, y, conf = linear_problem(6)
    kw = {"confidence": conf, "keep": 400, "seed": 6}
    assert ls_max(y, **kw) == pytest.approx(8.0, rel=0.03)
    assert linear_separability(z, y, **kw) < 1.1
    rnd = np.random.default_rng(10).integers(0, 2, size=y.shape)
    assert linear_separability(z, rnd, **kw) <= ls_max(rnd, **kw) + 1e-9
    skewed = (np.random.default_rng(11).random(size=y.shape) < 0.1).astype(int)
    h_skew = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))  # nats per attribute
    assert ls_max(skewed, **kw) == pytest.approx(np.exp(3 * h_skew), rel=0.1)  # about 2.7, not 8
    assert linear_separability(z, skewed, **kw) <= ls_max(skewed, **kw) + 1e-9


def test_ls_keeps_the_most_confident():
    """Noise on the least confident half of the labels is dropped by `keep`, and counts without it."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 3))
    labels = (z[:, :1] > 0).astype(int)
    conf = np.abs(z[:, :1])
    noisy = labels.copy()
    low = np.argsort(conf[:, 0])[:200]
    noisy[low] = rng.integers(0, 2, size=(200, 1))
    assert linear_separability(z, noisy, confidence=conf, keep=200) == pytest.approx(1.0, abs=1e-9)
    assert linear_separability(z, noisy) > 1.1


def test_ls_is_deterministic_given_the_seed():
    z, y, conf = linear_problem(5, d=128)
    y[:, 2] = np.random.default_rng(9).integers(0, 2, size=len(z))
    a = linear_separability(z, y, confidence=conf, keep=300, seed=11)
    assert linear_separability(z, y, confidence=conf, keep=300, seed=11) == a
    assert any(linear_separability(z, y, confidence=conf, keep=300, seed=s) != a for s in (12, 13))


def test_heldout_split_is_stratified_seeded_and_disjoint():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    fit, out = heldout_split(y, 0.3, seed=1)
    assert len(out) == 30 and np.array_equal(np.sort(np.concatenate([fit, out])), np.arange(100))
    assert [int((y[out] == c).sum()) for c in range(3)] == [18, 9, 3]  # each class in proportion
    again = heldout_split(y, 0.3, seed=1)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], out)
    assert not np.array_equal(heldout_split(y, 0.3, seed=2)[1], out)
    assert [len(p) for p in heldout_split(np.array([0, 1, 1]), 0.01, seed=0)] == [2, 1]  # never an empty part
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="heldout"):
            heldout_split(y, bad, seed=0)


def test_one_class_in_the_fit_part_is_predicted_everywhere():
    """A rare class that lands only in the held-out part: the SVM cannot be fitted, the prediction is the
    one class seen, and H(Y|X) = H(Y) on the held-out part."""
    z = np.random.default_rng(0).normal(size=(6, 4))
    y = np.array([0, 0, 0, 0, 0, 1])
    seed = next(s for s in range(100) if 5 in heldout_split(y, 0.5, (s, 0))[1])  # attribute 0's split: seeded by (seed, 0)
    h_y = -(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3)  # the held-out part: two 0s and the 1
    assert linear_separability(z, y, heldout=0.5, seed=seed) == pytest.approx(np.exp(h_y))


def test_rbf_on_a_precomputed_kernel_is_scikit_learns_rbf_svm():
    """The rbf SVM gets its kernel matrix from one matrix product (fast at 196,608 dims): same predictions as
    SVC(kernel="rbf", gamma="scale"), binary and 5-class."""
    from sklearn.svm import SVC

    from isosweep.evaluation.metrics.separability import _fit_predict

    rng = np.random.default_rng(0)
    z, z_out = rng.normal(size=(300, 200)), rng.normal(size=(300, 200))
    for y in ((z[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int), rng.integers(0, 5, size=300)):
        ref = SVC(kernel="rbf", C=1.0, gamma="scale").fit(z, y).predict(z_out)
        assert np.array_equal(_fit_predict(z, y, z_out, "rbf", 0), ref)


def test_linear_svm_in_the_span_of_the_fit_samples_is_scikit_learns():
    """With fewer fit samples than dimensions the linear SVM is fitted in an orthonormal basis of their span:
    the same predictions as LinearSVC(C=1) on the raw latents, same settings (the same solver iterates, each
    on n numbers per sample instead of d: 3x faster here, 50x on the shapes h, 4,096 dims)."""
    import warnings

    from sklearn.svm import LinearSVC

    from isosweep.evaluation.metrics.separability import _fit_predict

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(20, 400))  # correlated features, like h: 400 dimensions of 20 factors plus noise
    z = rng.normal(size=(240, 20)) @ mix + 0.1 * rng.normal(size=(240, 400))
    z_fit, z_out = z[:120], z[120:]
    for y in ((z_fit[:, 0] > 0).astype(int), rng.integers(0, 3, size=120)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LinearSVC(C=1.0, dual=True, max_iter=10000, random_state=0).fit(z_fit, y).predict(z_out)
        assert np.array_equal(_fit_predict(z_fit, y, z_out, "linear", 0), ref)


def test_ls_names_are_result_metrics():
    """Every value ls_scores can return is a results column (spec.RESULT_METRICS), x_T keeps the old names."""
    kernels = typing.get_args(typing.get_args(LsSpec.model_fields["kernels"].annotation)[0])
    names = {ls_name(sp, k) for sp, k in itertools.product(LS_SPACES, kernels)}
    assert names == {"ls", "ls_rbf", "ls_h", "ls_h_rbf"} and names <= set(RESULT_METRICS)
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(40, 8)), rng.integers(0, 2, size=(40, 1))
    out = ls_scores({"x_T": z, "h": z[:, :4]}, y, np.ones((40, 1)), keep=40, kernels=("linear",), seed=0)
    assert set(out) == {"ls", "ls_h", "ls_max"} and "ls_max" in RESULT_METRICS


def test_ls_spec_fields_and_errors():
    ls = EvaluationSpec().ls
    assert (ls.heldout, ls.spaces) == (0.5, ["x_T"])  # the paper's latents, half of the kept samples held out
    assert EvaluationSpec(ls={"spaces": ["x_T", "h"], "heldout": 0.25}).ls.spaces == ["x_T", "h"]
    for bad in ({"heldout": 0.0}, {"heldout": 1.0}, {"spaces": []}, {"spaces": ["z"]}):
        with pytest.raises(ValueError):
            EvaluationSpec(ls=bad)


def test_classify_samples_captures_h_of_x_T_at_the_first_ddim_step():
    """h for LS is the bottleneck e_t(x_T) at the first DDIM timestep t: what `core.hspace.encode` computes."""
    from diffusers import DDPMScheduler, UNet2DModel

    from isosweep.core.hspace import encode
    from isosweep.core.sampling import DDIMSampler, initial_noise

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    sampler = DDIMSampler(unet, DDPMScheduler(num_train_timesteps=1000), batch_size=3, progress=False)

    def classifier(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images.mean((1, 2, 3)) > 0).long()[:, None], torch.ones(len(images), 1)

    samples = SampleRange(sampler=sampler, shape=(3, 8, 8), seed=3, ddim_steps=4, total=5, batch_size=3)
    labels, conf, h = classify_samples(samples, classifier, capture_h=True)
    assert labels.shape == conf.shape == (5, 1) and h.shape == (5, 16 * 4 * 4)
    t_first = sampler(initial_noise(1, (3, 8, 8), 3), 4).timesteps[0]
    with torch.no_grad():
        ref = encode(unet, initial_noise(5, (3, 8, 8), 3), t_first).flatten(1).numpy()
    np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-5)
    assert classify_samples(samples, classifier)[2] is None
