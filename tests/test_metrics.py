"""Metrics and sampling: closed forms, known maps, and a tiny UNet end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from isosweep.core.sampling import ddim_sample, initial_noise
from isosweep.evaluation.metrics import (
    batched_jacobian,
    frechet_distance,
    jacobian_singular_values,
    lerp,
    looped_jacobian,
    mcn,
    relative_trajectory_length,
    slerp,
    vor,
)
from isosweep.evaluation.metrics.jacobian import autodiff_context, pooled_encoder, unet_encoder
from isosweep.evaluation.metrics.ppl import filtered_mean

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(sample_size: int = 16, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    # for commuting covariances: |mu1-mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    l1, l2 = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    s1, s2 = Q @ np.diag(l1) @ Q.T, Q @ np.diag(l2) @ Q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n", [20, 400])
def test_frechet_equals_clean_fids_general_sqrtm_for_non_commuting_and_rank_deficient_covariances(n):
    """The symmetric route (two eigh) gives clean-fid's number (a general sqrtm of sigma1 sigma2), also when the
    covariances do not commute and when fewer samples than dimensions leave them singular (n = 20 < d = 64)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
    b = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 1.0  # not the commuting case the closed form above covers
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cleanfid_frechet(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.parametrize("n", [8, 63, 64, 65, 300])
def test_fid_of_features_and_its_resamples_equal_clean_fids_on_either_side_of_n_equals_d(n):
    """FID of N generated features against reference statistics, and of weighted resamples of them: through the
    N x N Gram matrix when N <= d (the generated covariance has rank < d), through the d x d route above it; on both
    sides clean-fid's number for the np.cov statistics of the same (repeated) rows. Features are offset far from 0,
    as Inception's are, so the centring of the Gram matrix is tested too."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    from isosweep.evaluation.metrics.confidence import fid_of_counts
    from isosweep.evaluation.metrics.fid import feature_statistics, fid_from_features

    rng = np.random.default_rng(n)
    d = 64
    ref = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) / 8 + 3.0
    mu_r, s_r = feature_statistics(ref)
    x = np.abs(rng.normal(size=(n, d))) * 2 + 5.0
    expected = cleanfid_frechet(*feature_statistics(x), mu_r, s_r)
    assert fid_from_features(x, mu_r, s_r) == pytest.approx(expected, rel=1e-6)
    counts = np.vstack([np.ones(n, int), rng.multinomial(n, np.ones(n) / n, size=3)])
    for c, got in zip(counts, fid_of_counts(x, mu_r, s_r)(counts)):
        assert got == pytest.approx(cleanfid_frechet(*feature_statistics(np.repeat(x, c, axis=0)), mu_r, s_r), rel=1e-6)


def test_frechet_refuses_non_finite_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)


def test_frechet_one_dimensional_closed_form():
    # W2^2 of N(0, 1) and N(3, 4): 9 + (1 - 2)^2 = 10
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == pytest.approx(10.0)


# ---------------------------------------------------------------- FID reference statistics


def test_reference_statistics_are_recomputed_when_an_image_is_replaced_under_the_same_path(tmp_path):
    """The cache key holds the image files' fingerprint (paths, sizes, mtimes), not only the folder's path: an
    unchanged folder is a cache hit, one image replaced in place gives a new cache file and new statistics."""
    import os

    from PIL import Image

    from isosweep.evaluation.suite_metrics.fid import _reference_stats
    from isosweep.spec import DatasetSpec, EvaluationSpec

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ev = EvaluationSpec(cache_dir=str(tmp_path / "cache"), batch_size=4)
    ds = DatasetSpec(kind="image_folder", path=str(folder), resolution=8, random_flip=False)
    embedded = []

    def features(images):  # a stand-in network: each image's 4x4 average-pooled pixels
        embedded.append(images.shape[0])
        return torch.nn.functional.avg_pool2d(images, 2).flatten(1)

    def stats():
        embedded.clear()
        mu, sigma = _reference_stats(ev, ds, features, "pool4", progress=False)
        return mu, sigma, sum(embedded), sorted(p.name for p in (tmp_path / "cache" / "fid_stats").iterdir())

    mu1, sigma1, n1, files1 = stats()
    assert n1 == 6 and len(files1) == 1
    mu2, sigma2, n2, files2 = stats()
    assert n2 == 0 and files2 == files1 and np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2)  # a hit

    replaced = folder / "3.png"
    before = replaced.stat()
    Image.fromarray(255 - np.asarray(Image.open(replaced))).save(replaced)  # same path, new bytes
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # and a later mtime, always
    mu3, sigma3, n3, files3 = stats()
    assert n3 == 6 and len(files3) == 2 and not np.allclose(mu3, mu1)
    assert stats()[2] == 0  # the new statistics are cached in turn


# ---------------------------------------------------------------- slerp / lerp / RTL


def test_slerp_uses_each_pairs_own_angle():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [-1.0, 1e-9]])  # 90 and ~180 degrees
    b[1] = torch.tensor([math.cos(2.5), math.sin(2.5)])
    s = torch.tensor([0.5, 0.5])
    out = slerp(a, b, s)
    # the midpoint of each pair is at half of that pair's own angle
    assert torch.allclose(out[0], torch.tensor([math.cos(math.pi / 4), math.sin(math.pi / 4)]), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([math.cos(1.25), math.sin(1.25)]), atol=1e-6)
    # and a batch gives the same as each pair alone
    for i in range(2):
        assert torch.allclose(out[i], slerp(a[i : i + 1], b[i : i + 1], s[i : i + 1])[0])


def test_slerp_endpoints_exact_and_constant_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.equal(slerp(a, b, torch.zeros(4)), a)
    assert torch.equal(slerp(a, b, torch.ones(4)), b)
    norms = a.flatten(1).norm(dim=1)
    for s in torch.linspace(0, 1, 7):
        out = slerp(a, b, s.expand(4))
        assert torch.allclose(out.flatten(1).norm(dim=1), norms, rtol=1e-5)


def test_lerp_per_pair():
    a, b = torch.zeros(3, 2), torch.ones(3, 2)
    out = lerp(a, b, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_rtl_straight_path_is_one_and_half_circle_is_half_pi():
    k = torch.linspace(0, 1, 11)
    straight = (k[:, None, None] * torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]])[None])  # (K+1, B=2, 3)
    assert torch.allclose(relative_trajectory_length(straight), torch.ones(2, dtype=torch.float64))
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    circle = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)[:, None, :] * 3.0  # radius 3
    assert relative_trajectory_length(circle).item() == pytest.approx(math.pi / 2, rel=1e-6)


# ---------------------------------------------------------------- Jacobian, MCN, VoR


def test_mcn_one_and_vor_zero_for_scaled_orthogonal_encoder():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    enc = lambda x: 2.5 * x @ Q.T  # noqa: E731
    sv = jacobian_singular_values(enc, torch.randn(8, 6, generator=g, dtype=torch.float64), pool=None)
    assert sv.shape == (8, 6)
    assert mcn(sv) == pytest.approx(1.0, abs=1e-9)
    assert vor(sv) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(sv, torch.full_like(sv, 2.5))


def test_mcn_equals_condition_number_of_a_known_linear_map():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 7, generator=g)
    sv = jacobian_singular_values(lambda x: x @ A.T, torch.randn(5, 7, generator=g), pool=None)
    assert torch.all(sv[:, :-1] >= sv[:, 1:])  # largest first
    assert mcn(sv) == pytest.approx(torch.linalg.cond(A.double()).item(), rel=1e-5)


def test_vor_positive_when_metric_varies_and_scale_invariant():
    # encoder x -> (1 + x_0^2) x: singular values change with x
    enc = lambda x: (1 + x[:, :1] ** 2) * x  # noqa: E731
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sv = jacobian_singular_values(enc, x, pool=None)
    sv10 = jacobian_singular_values(lambda x: 10 * enc(x), x, pool=None)
    assert vor(sv) > 0.01
    assert vor(sv10) == pytest.approx(vor(sv), rel=1e-9)


def test_batched_jacobian_equals_looped_on_tiny_unet():
    unet = tiny_unet(8)
    enc = pooled_encoder(unet_encoder(unet, 500), 2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with autodiff_context(unet):
        ref = looped_jacobian(enc, x)
        assert ref.shape == (2, 32 * 2 * 2, 3 * 8 * 8)
        assert ref.abs().max() > 1e-3
        for method in ("vjp", "jvp", "batched", "auto"):
            J = batched_jacobian(enc, x, method=method, chunk_size=37)
            assert J.shape == ref.shape
            assert torch.allclose(J, ref, atol=1e-5, rtol=1e-4), method
        # the chunk sized from the memory budget gives the same
        assert torch.allclose(batched_jacobian(enc, x, method="vjp", memory_budget_mb=1), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- linear separability: tests/test_metrics_separability.py


def test_ppl_percentile_filter():
    v = np.concatenate([np.ones(990), np.full(5, 1e9), np.full(5, -1e9)])
    assert filtered_mean(v) == pytest.approx(1.0)
    assert filtered_mean(np.arange(101.0)) == pytest.approx(50.0)  # drops 0 and 100


# ---------------------------------------------------------------- sampling


def test_initial_noise_sharded_equals_unsharded():
    full = initial_noise(7, (3, 4, 4), seed=5)
    parts = torch.cat([initial_noise(3, (3, 4, 4), 5, start=0), initial_noise(4, (3, 4, 4), 5, start=3)])
    assert torch.equal(full, parts)
    assert not torch.equal(initial_noise(2, (3,), 5), initial_noise(2, (3,), 6))
    assert not torch.equal(initial_noise(2, (3,), 5, stream=1), initial_noise(2, (3,), 5))


def test_ddim_sampling_is_deterministic_and_batch_independent():
    unet, sched = tiny_unet(16), ddpm_scheduler()
    x = initial_noise(3, (3, 16, 16), seed=0)
    a = ddim_sample(unet, sched, x, 4, batch_size=3, capture_h=True, progress=False)
    b = ddim_sample(unet, sched, x, 4, batch_size=2, capture_h=True, progress=False)
    assert a.images.shape == (3, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.h.shape == (4, 3, 32, 8, 8)
    assert len(a.timesteps) == 4 and a.timesteps[0] > a.timesteps[-1]
    # a batching mistake moves values by O(1); fp32 convolutions of another batch size may differ by ~1.5e-5 after
    # 4 steps, depending on the CPU's kernels
    assert torch.allclose(a.images, b.images, atol=1e-4)
    assert torch.allclose(a.h, b.h, atol=1e-4)
    assert sched.num_inference_steps is None  # the caller's scheduler is untouched


def test_ddim_sample_matches_diffusers_ddim_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler

    unet, sched = tiny_unet(16), ddpm_scheduler()
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), eta=0.0, num_inference_steps=5,
               output_type="np").images  # (B, H, W, C) in [0, 1], from the same noise
    ours = ddim_sample(unet, sched, x, 5, progress=False).images
    assert np.allclose((ours.numpy().transpose(0, 2, 3, 1) + 1) / 2, ref, atol=1e-5)


def test_ddim_sample_is_exactly_the_plain_ddim_loop():
    """inference_mode, batching and the float32 DDIM update change no bit of the fp32 result."""
    from diffusers import DDIMScheduler

    unet, sched = tiny_unet(16), ddpm_scheduler()
    x_T = initial_noise(3, (3, 16, 16), seed=1)
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(4)
    with torch.no_grad():
        x = x_T.clone()
        for t in ddim.timesteps:
            x = ddim.step(unet(x, int(t)).sample, int(t), x, eta=0.0).prev_sample
    for grad_mode in ("inference", "no_grad"):
        assert torch.equal(ddim_sample(unet, sched, x_T, 4, batch_size=3, progress=False, grad_mode=grad_mode).images,
                           x.clamp(-1, 1))


def test_ddim_sample_returns_ordinary_tensors():
    """Sampled under inference_mode, but the images and h can go into autograd and be changed in place later."""
    unet, sched = tiny_unet(16), ddpm_scheduler()
    out = ddim_sample(unet, sched, initial_noise(3, (3, 16, 16), seed=0), 2, batch_size=2, capture_h=True, progress=False)
    assert not torch.is_inference(out.images) and not torch.is_inference(out.h)
    assert not out.images.requires_grad
    w = torch.ones((), requires_grad=True)
    ((w * out.images).sum() + (w * out.h).sum()).backward()  # saves both for backward: fails on inference tensors
    assert w.grad is not None
    out.images.add_(1.0)
    with torch.inference_mode():  # a caller in inference mode (the metrics) still gets inference tensors: its choice
        assert torch.is_inference(ddim_sample(unet, sched, initial_noise(1, (3, 16, 16), seed=0), 1, progress=False).images)


def test_ddim_sample_precision_choices():
    from isosweep.core.sampling import DDIMSampler

    unet, sched = tiny_unet(16), ddpm_scheduler()
    x = initial_noise(2, (3, 16, 16), seed=0)
    with pytest.raises(ValueError, match="fp16.*GPU"):
        ddim_sample(unet, sched, x, 2, progress=False, precision="fp16")
    with pytest.raises(ValueError, match="fp16.*GPU"):
        DDIMSampler(unet, sched, progress=False, precision="fp16")(x, 2)
    with pytest.raises(ValueError, match="precision"):
        ddim_sample(unet, sched, x, 2, progress=False, precision="float16")
    with pytest.raises(ValueError, match="grad_mode"):
        ddim_sample(unet, sched, x, 2, progress=False, grad_mode="enable_grad")
    fp32 = ddim_sample(unet, sched, x, 2, progress=False).images
    bf16 = DDIMSampler(unet, sched, progress=False, precision="bf16")(x, 2, capture_h=True)
    assert bf16.images.dtype == torch.float32 and bf16.h.dtype == torch.float32
    assert not torch.equal(bf16.images, fp32)  # autocast did act
    assert (bf16.images - fp32).abs().max() < 0.1
    assert next(unet.parameters()).dtype == torch.float32  # the model is untouched


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_ddim_sample_half_precision_on_gpu(precision):
    unet, sched = tiny_unet(16).cuda(), ddpm_scheduler()
    x = initial_noise(4, (3, 16, 16), seed=0)
    fp32 = ddim_sample(unet, sched, x, 4, progress=False).images
    half = ddim_sample(unet, sched, x, 4, progress=False, precision=precision, capture_h=True)
    assert half.images.device.type == "cpu" and half.images.dtype == torch.float32 and half.h.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a few pixels of a random UNet move by tenths, the bulk by far less
    diff = (half.images - fp32).abs()
    assert diff.mean() < 0.02 and diff.quantile(0.99) < 0.15, (diff.mean(), diff.quantile(0.99), diff.max())
