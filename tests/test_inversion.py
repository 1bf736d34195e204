"""DDIM inversion: the known answer (an image DDIM drew from x_T inverts back to x_T, and redraws as itself)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, UNet2DModel

from isosweep.core.inversion import ddim_invert, predicted_epsilon
from isosweep.core.sampling import ddim_sample
from isosweep.models.builtin import default_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10


def _unet(dtype: torch.dtype) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    return unet.to(dtype).eval()


def _scheduler(prediction_type: str = "epsilon", **config) -> DDPMScheduler:
    """isosweep's DDPM schedule without the x_0 clip: with it, the sampler maps many x_t to one image and nothing inverts."""
    base = {k: v for k, v in default_scheduler().config.items() if not k.startswith("_")}
    return DDPMScheduler(**{**base, "prediction_type": prediction_type, "clip_sample": False, **config})


@torch.no_grad()
def _drawn(unet, scheduler, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0), unclamped and in x_T's dtype: the reference the inversion must undo."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x = x_T
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("dtype, refine, tolerance, spacing, steps", [
    (torch.float64, 30, 1e-12, "leading", STEPS),
    (torch.float32, 10, 1e-5, "leading", STEPS),
    (torch.float64, 30, 1e-12, "trailing", 7),  # 1000 / 7 is no integer: diffusers' steps land between its timesteps
])
def test_inverting_a_drawn_image_gives_back_its_x_T(dtype, refine, tolerance, spacing, steps):
    """Measured: float64 |x_T' - x_T| <= 1.8e-15 after 30 refinements (x_T up to 3.7), float32 1.6e-6 after 10; the
    redraw of x_T' matches the image as closely (relative to its size: a random UNet draws pixels in the hundreds)."""
    unet, scheduler = _unet(dtype), _scheduler(timestep_spacing=spacing)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    image = _drawn(unet, scheduler, x_T, steps)
    inverted = ddim_invert(unet, scheduler, image, steps, refine=refine, progress=False, batch_size=1)
    assert inverted.dtype == dtype
    assert (inverted - x_T).abs().max() < tolerance
    assert ((_drawn(unet, scheduler, inverted, steps) - image).abs().max() / image.abs().max()) < tolerance
    # isosweep's sampler draws the same image from it (in float32, clamped to [-1, 1] as it returns images)
    redrawn = ddim_sample(unet, scheduler, inverted, steps, progress=False).images
    assert (redrawn - image.clamp(-1, 1).float()).abs().max() < 1e-4


def test_plain_inversion_is_diffusers_ddim_inverse_scheduler_and_only_approximate():
    """refine=0 is plain DDIM inversion: for an epsilon model, step for step diffusers' DDIMInverseScheduler (equal to
    the last bit in float64). It evaluates the model at the lower point of each step, so it misses x_T (by 0.53)."""
    unet, scheduler = _unet(torch.float64), _scheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    image = _drawn(unet, scheduler, x_T, STEPS)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(STEPS)
    x = image
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t).sample, t, x).prev_sample
    plain = ddim_invert(unet, scheduler, image, STEPS, progress=False)
    assert (plain - x).abs().max() < 1e-12
    assert (plain - x_T).abs().max() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predicted_epsilon_reads_the_output_as_the_sampler_does(prediction_type):
    """The epsilon of an output is the one DDIMScheduler's step implies: x = sqrt(a) x_0 + sqrt(1 - a) eps."""
    ddim = DDIMScheduler.from_config(_scheduler(prediction_type).config)
    ddim.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(2)
    x, output = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for t in (int(ddim.timesteps[0]), int(ddim.timesteps[-1])):
        a = ddim.alphas_cumprod[t]  # float32, as the step reads it (its square roots rounded as there)
        x0 = ddim.step(output, t, x).pred_original_sample
        eps = predicted_epsilon(output, x, a, prediction_type)
        assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, atol=1e-10)


def test_a_schedule_the_inverse_scheduler_cannot_walk_is_refused():
    scheduler = _scheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="timestep_spacing 'leading' or 'trailing'"):
        ddim_invert(_unet(torch.float32), scheduler, torch.zeros(1, 3, 8, 8), STEPS, progress=False)
