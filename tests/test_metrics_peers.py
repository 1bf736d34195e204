"""The standard networks against their reference implementations, on the stand-in weight files (tests/support).

FID: isosweep's `InceptionFeatures` and Frechet distance against clean-fid's own folder pipeline on PNGs of
natural image patches. LPIPS: `LpipsDistance` against the lpips package loading torchvision's AlexNet itself.
PPL: `perceptual_path_length` against StyleGAN's definition written out here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isosweep.evaluation.features.common import INCEPTION_NAME, LPIPS_NAME, UNPUBLISHED, UNVERIFIED
from isosweep.evaluation.features.standard import InceptionFeatures, LpipsDistance
from isosweep.evaluation.metrics import frechet_distance
from isosweep.evaluation.metrics.fid import feature_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photographs, 427 x 640 x 3 uint8: china.jpg, flower.jpg (decoded once: seconds)."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo_patches(size: int, per_photo: int, seed: int = 0) -> list[np.ndarray]:
    """`per_photo` random size x size crops (uint8 HWC) of each of scikit-learn's two sample photographs."""
    rng = np.random.default_rng(seed)
    out = []
    for photo in _photos():
        h, w, _ = photo.shape
        for _ in range(per_photo):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            out.append(np.ascontiguousarray(photo[y : y + size, x : x + size]))
    return out


def write_pngs(folder: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Save as PNG (in name order) and return what reading them back gives, as clean-fid will read them."""
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return [np.asarray(Image.open(folder / f"{i:03d}.png")) for i in range(len(images))]


def as_model_input(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, C) or (H, W) images -> (B, C, H, W) float in [-1, 1], what a sampler hands the metrics."""
    x = torch.from_numpy(np.stack(images)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1


def cleanfid_folder_features(folder: Path, weights_dir: Path) -> np.ndarray:
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights_dir), download=False, resize_inside=False).to(CPU).eval()
    return get_folder_features(str(folder), model=model, num_workers=0, batch_size=8, device=CPU, mode="clean", verbose=False)


def relative_difference(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-300))


FID_DIMS = 256  # the Frechet distances are compared over the first 256 of the 2048 features: one 2048-dim sqrtm
# takes 3-4 minutes on the project's 2-core CPU under load (212 s measured), and the features are compared in full


@pytest.mark.parametrize("size", [64, 256])
def test_inception_features_and_fid_equal_clean_fids_folder_pipeline(size, tmp_path, standard_weights):
    """Two folders of photo patches (china vs flower): features per image and the Frechet distance between the
    folders as clean-fid computes them from the PNGs (PIL bicubic float resize to 299, its frechet_distance)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    patches = photo_patches(size, per_photo=10)
    ours_fn = InceptionFeatures(standard_weights.inception)
    feats, refs = [], []
    for name, images in (("china", patches[:10]), ("flower", patches[10:])):
        stored = write_pngs(tmp_path / name, images)
        feats.append(ours_fn(as_model_input(stored)).numpy())
        refs.append(cleanfid_folder_features(tmp_path / name, standard_weights.dir))
        assert feats[-1].shape == refs[-1].shape == (10, 2048)
        assert relative_difference(feats[-1], refs[-1]) < 1e-3
    assert np.abs(refs[0] - refs[1]).max() > 10 * np.abs(feats[0] - refs[0]).max()  # the images do differ in features
    feats, refs = [f[:, :FID_DIMS] for f in feats], [r[:, :FID_DIMS] for r in refs]
    ours = frechet_distance(*feature_statistics(feats[0]), *feature_statistics(feats[1]))
    ref = cleanfid_frechet(refs[0].mean(0), np.cov(refs[0], rowvar=False), refs[1].mean(0), np.cov(refs[1], rowvar=False))
    assert ref > 0
    assert abs(ours - ref) / ref < 1e-3
    assert ours_fn.name.startswith(f"{INCEPTION_NAME}-{UNVERIFIED}-")  # a stand-in never carries the published name


def test_inception_features_of_grayscale_images_equal_clean_fids(tmp_path, standard_weights):
    """One-channel images: isosweep repeats the channel; clean-fid reads the grayscale PNG as RGB."""
    gray = [np.asarray(Image.fromarray(p).convert("L")) for p in photo_patches(64, per_photo=3, seed=1)]
    stored = write_pngs(tmp_path / "gray", gray)
    ours = InceptionFeatures(standard_weights.inception)(as_model_input(stored)).numpy()
    assert relative_difference(ours, cleanfid_folder_features(tmp_path / "gray", standard_weights.dir)) < 1e-3


@pytest.fixture
def reference_lpips(standard_weights, monkeypatch):
    """The lpips package's own LPIPS v0.1 AlexNet, with torchvision loading the AlexNet file from TORCH_HOME."""
    import lpips

    monkeypatch.setenv("TORCH_HOME", str(standard_weights.torch_home))
    return lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()


def test_lpips_distance_equals_the_lpips_package(standard_weights, reference_lpips):
    patches = as_model_input(photo_patches(64, per_photo=4, seed=2))  # 8 images: china 0-3, flower 4-7
    a = patches
    b = torch.cat([patches[1:], patches[:1]])  # each against another patch
    c = (patches + 0.05 * torch.randn(patches.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ours = LpipsDistance(standard_weights.alexnet)
    for x, y in ((a, b), (a, c)):
        with torch.no_grad():
            ref = reference_lpips(x, y).reshape(-1)
        got = ours(x, y)
        assert got.shape == (8,) and ref.min() > 0
        assert (got - ref).abs().max() < 1e-5
    assert ours.name.startswith(f"{LPIPS_NAME}-{UNPUBLISHED}-")


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()


def _stylegan_slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation per row along the great circle through a and b, t may leave [0, 1] (float64)."""
    af, bf = a.reshape(len(a), -1), b.reshape(len(b), -1)
    omega = np.arccos(np.clip((af * bf).sum(1) / (np.linalg.norm(af, axis=1) * np.linalg.norm(bf, axis=1)), -1, 1))
    wa, wb = np.sin((1 - t) * omega) / np.sin(omega), np.sin(t * omega) / np.sin(omega)
    return (wa[:, None] * af + wb[:, None] * bf).reshape(a.shape)


def test_ppl_equals_stylegans_definition(standard_weights, reference_lpips):
    """PPL = mean, over pairs between the 1st and 99th percentile, of LPIPS(G(slerp(z0, z1; s)),
    G(slerp(z0, z1; s + eps))) / eps^2, with G = deterministic DDIM (eta 0) from diffusers' own scheduler step and
    LPIPS from the lpips package. Both sides take the pair ends and positions from isosweep's seeded streams."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from isosweep.core.sampling import DDIMSampler
    from isosweep.evaluation.metrics.ppl import perceptual_path_length, ppl_pairs
    from isosweep.evaluation.metrics.samples import SampleRange

    n, eps, steps, seed, shape = 120, 1e-4, 2, 5, (3, 32, 32)  # > 100 pairs, so the percentile filter drops some
    unet, sched = _tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    samples = SampleRange(sampler=DDIMSampler(unet, sched, batch_size=2 * n, progress=False), shape=shape, seed=seed, ddim_steps=steps,
                          total=n, batch_size=n)
    ours = perceptual_path_length(samples, LpipsDistance(standard_weights.alexnet), eps=eps)

    z0, z1, s = (v.double().numpy() for v in ppl_pairs(n, shape, seed))
    ends = np.concatenate([_stylegan_slerp(z0, z1, s), _stylegan_slerp(z0, z1, s + eps)])
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(steps)
    with torch.no_grad():
        x = torch.from_numpy(ends).float()
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        images = x.clamp(-1, 1)
        d = reference_lpips(images[:n], images[n:]).reshape(-1).double().numpy() / eps**2
    lo, hi = np.percentile(d, 1, method="lower"), np.percentile(d, 99, method="higher")
    kept = d[(d >= lo) & (d <= hi)]
    assert len(kept) < n  # the filter did drop the extremes
    ref = kept.mean()
    assert ref > 0
    assert abs(ours - ref) / ref < 1e-6, (ours, ref)  # the same operations on both sides: equal up to rounding
