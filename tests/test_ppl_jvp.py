"""PPL by forward-mode differentiation (`evaluation.ppl.method: jvp`) against the finite difference it is the limit of.

Known answers: the slerp velocity and the DDIM tangent against central differences in float64; the quadratic form
of a distance that is an explicit weighted sum of squares of a linear map; LPIPS (the lpips package on the stand-in
AlexNet) and the domain distance against d(a, a + eps u) / eps^2 as eps shrinks; and a whole PPL's per-pair values
against the finite difference on a small UNet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isosweep.core.sampling import DDIMSampler, ddim_sample, ddim_tangent
from isosweep.evaluation.features.domain import DomainDistance, ShapesNet
from isosweep.evaluation.features.standard import LpipsDistance
from isosweep.evaluation.metrics.paths import slerp, slerp_tangent
from isosweep.evaluation.metrics.ppl import ppl_distances, tangent_quadratic
from isosweep.evaluation.metrics.samples import SampleRange

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0, dtype=torch.float64):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval().to(dtype)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def domain_distance(dtype=torch.float64) -> DomainDistance:
    torch.manual_seed(1)
    return DomainDistance(ShapesNet((3, 4)).eval().to(dtype), resolution=16)


def test_slerp_tangent_is_the_derivative_of_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    b[4] = a[4] * 1.0000000001  # a pair slerp treats as a lerp
    s = torch.tensor([0.0, 0.3, 0.5, 0.99, 0.4], dtype=torch.float64)
    h = 1e-6
    central = (slerp(a, b, s + h) - slerp(a, b, s - h)) / (2 * h)
    assert torch.allclose(slerp_tangent(a, b, s), central, rtol=1e-6, atol=1e-8)


def test_the_ddim_tangent_is_the_derivative_of_the_sampler_and_its_images_are_the_samplers():
    unet, sch = tiny_unet(), scheduler()
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    images, tangent = ddim_tangent(unet, sch, x, v, 5)
    plain = ddim_sample(unet, sch, x, 5, progress=False).images
    assert torch.equal(images, plain.float())
    h = 1e-6
    central = (ddim_sample(unet, sch, x + h * v, 5, progress=False).images.double()
               - ddim_sample(unet, sch, x - h * v, 5, progress=False).images.double()) / (2 * h)
    # float32 outputs of a float64 run: the central difference carries ~1e-7 / 1e-6 of rounding
    assert (tangent.double() - central).abs().max() < 2e-2 * central.abs().max()
    assert torch.nn.functional.cosine_similarity(tangent.double().flatten(), central.flatten(), dim=0) > 0.9999
    # pixels the final clamp holds at -1 or 1 do not move: their tangent is zero, as the finite difference sees it
    # (a scheduler that does not clip its x0 prediction, so that the clamp is what holds them)
    from diffusers import DDPMScheduler

    images, tangent = ddim_tangent(unet, DDPMScheduler(num_train_timesteps=1000, clip_sample=False), 6 * x, v, 5)
    held = images.abs() == 1
    assert held.any() and not held.all() and torch.all(tangent[held] == 0) and tangent[~held].abs().max() > 0


def test_the_quadratic_of_a_weighted_sum_of_squares_is_exact():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(7, 12, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64)

    def distance(p, q):
        return (w * ((p.flatten(1) - q.flatten(1)) @ A.T) ** 2).sum(1)

    a, u = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    exact = (w * (u.flatten(1) @ A.T) ** 2).sum(1)
    assert torch.allclose(tangent_quadratic(distance, a, u), exact, rtol=1e-12)


@pytest.mark.parametrize("which", ["lpips", "domain"])
def test_the_quadratic_is_the_limit_of_the_distance_over_eps_squared(which, standard_weights):
    if which == "lpips":
        distance = LpipsDistance(standard_weights.alexnet)
        distance.model.double()
        size = 32
    else:
        distance, size = domain_distance(), 16
    g = torch.Generator().manual_seed(4)
    a = torch.rand(3, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    u = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64)
    raw = distance.model if which == "lpips" else distance  # LpipsDistance casts to float32; its model is float64 here

    def dist(p, q):
        return raw(p, q).reshape(-1)

    q = tangent_quadratic(dist, a, u)
    errors = [float(((dist(a, a + eps * u) / eps**2 - q).abs() / q).max()) for eps in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors  # converges, first order in eps


def _samples(unet, n=6, steps=4) -> SampleRange:
    return SampleRange(sampler=DDIMSampler(unet, scheduler(), batch_size=8, progress=False), shape=(3, 16, 16), seed=5,
                       ddim_steps=steps, total=n, batch_size=3)


def test_ppl_by_jvp_is_the_limit_of_the_finite_difference_pair_by_pair():
    """Per pair on a float64 UNet: the finite difference approaches the JVP value as eps shrinks (a random UNet is far
    from linear: at eps = 1e-2 pairs are off by up to 30 %, at 1e-5 by under 0.1 %)."""
    unet, distance = tiny_unet(), domain_distance(torch.float32)
    jvp = ppl_distances(_samples(unet), distance, eps=1e-4, method="jvp")
    assert jvp.shape == (6,) and np.all(jvp > 0)
    err = {eps: np.abs(ppl_distances(_samples(unet), distance, eps=eps) / jvp - 1) for eps in (1e-2, 1e-5)}
    assert np.median(err[1e-5]) < np.median(err[1e-2]) / 20 and err[1e-5].max() < 0.01, err


def test_ppl_by_jvp_in_bf16_stays_near_fp32():
    """The derivative has no cancellation: bf16 moves each pair by the arithmetic's relative error, not by the factor
    of thousands a bf16 finite difference gives."""
    unet, distance = tiny_unet(dtype=torch.float32), domain_distance(torch.float32)
    fp32 = ppl_distances(_samples(unet, n=4, steps=3), distance, eps=1e-4, method="jvp")
    bf16 = ppl_distances(_samples(unet, n=4, steps=3), distance, eps=1e-4, method="jvp", precision="bf16")
    assert np.median(np.abs(bf16 / fp32 - 1)) < 0.05, (fp32, bf16)


def test_a_reduced_precision_finite_difference_is_refused():
    from pydantic import ValidationError

    from isosweep.spec.evaluation import PplSpec

    with pytest.raises(ValueError, match="needs precision 'fp32'"):
        ppl_distances(_samples(tiny_unet()), domain_distance(), eps=1e-4, precision="bf16")
    with pytest.raises(ValidationError, match="needs method 'jvp'"):
        PplSpec(precision="tf32")
    assert PplSpec(method="jvp", precision="bf16").precision == "bf16"
