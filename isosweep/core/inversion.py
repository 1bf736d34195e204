"""DDIM inversion (eta = 0): an image back to the x_T from which `core.sampling.ddim_sample` draws it again.

Deterministic DDIM maps x_t to x_t' (t' < t) through the model's prediction at (x_t, t). Inversion walks the
sampler's own timesteps (`sampling.ddim_scheduler`) the other way, lowest first, from x_t' up to x_t. Going up,
the prediction at x_t is not known yet: plain DDIM inversion (diffusers' `DDIMInverseScheduler`, the paper's
appendix) evaluates the model at (x_t', t) instead, which is exact only in the limit of small steps. `refine`
fixed-point iterations evaluate it again at the current estimate of x_t; at the fixed point a step is the exact
inverse of the sampler's step, so ddim_sample(ddim_invert(x)) = x and ddim_invert(ddim_sample(x_T)) = x_T up to
float error (tests/test_inversion.py measures both on an epsilon model). The iteration converges only where the
step is short against how fast the prediction, read as epsilon, changes with x_t: it does for an epsilon model,
and it does not for the built-in x_0 model, whose epsilon (x - sqrt(a) x_0) / sqrt(1 - a) changes fast at small t
(docs/editing.md has both measured).

Two things no inversion undoes: the sampler clips its predicted x_0 to [-1, 1] when the scheduler config says
`clip_sample` (DDPM's default, and the built-in model's) or thresholds it (`thresholding`), so where that binds
two x_t give one image; and `ddim_sample` clamps its images to [-1, 1]. The inversion itself clips nothing (the
DDIM ODE has no clip).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMInverseScheduler

from isosweep.core.progress import progress_bar
from isosweep.core.sampling import ddim_scheduler

__all__ = ["ddim_invert", "inverse_scheduler", "predicted_epsilon"]


def inverse_scheduler(ddim) -> DDIMInverseScheduler:
    """diffusers' `DDIMInverseScheduler` over the timesteps of the sampler's `ddim` (set), in reverse order.

    It is configured for epsilon and fed epsilon (`predicted_epsilon`, derived where the model was evaluated): told
    an x_0 model's prediction type, it derives the noise at the point below instead, which divides by zero at the
    first step (alpha_bar = 1 there) and elsewhere multiplies the model's error by 1 / sqrt(1 - alpha_bar) of that
    point (docs/editing.md has the measurement). clip_sample is off: the ODE has none. Refused (ValueError) where its
    schedule or its alphas would not be the sampler's."""
    spacing = ddim.config.timestep_spacing
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"DDIM inversion needs timestep_spacing 'leading' or 'trailing' (diffusers' DDIMInverseScheduler); "
                         f"this model's scheduler config has {spacing!r}")
    accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
    config = {k: v for k, v in ddim.config.items() if k in accepted}  # DDPM's variance_type etc. would each warn
    inverse = DDIMInverseScheduler.from_config({**config, "prediction_type": "epsilon", "clip_sample": False})
    inverse.set_timesteps(ddim.num_inference_steps)
    same = (inverse.timesteps.tolist() == ddim.timesteps.flip(0).tolist()
            and torch.equal(inverse.alphas_cumprod, ddim.alphas_cumprod)
            and float(inverse.initial_alpha_cumprod) == float(ddim.final_alpha_cumprod))
    if not same:
        raise ValueError(f"diffusers' DDIMInverseScheduler does not walk this model's DDIM schedule backwards "
                         f"(timesteps {ddim.timesteps.tolist()}); the inversion would not round-trip")
    return inverse


def predicted_epsilon(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise the model's output at x (noise level alpha_bar) stands for, read as diffusers' DDIMScheduler reads
    it: epsilon as is, an x_0 prediction as (x - sqrt(a) x_0) / sqrt(1 - a), v as sqrt(a) v + sqrt(1 - a) x."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (x - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, sample or v_prediction")


def ddim_invert(unet: torch.nn.Module, scheduler, x0: torch.Tensor, num_steps: int, *, refine: int = 0,
                batch_size: int = 64, progress: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """x_T (B, C, H, W) for images x0 (B, C, H, W) in [-1, 1]: the DDIM ODE run forward in time over the
    timesteps `ddim_sample(unet, scheduler, x_T, num_steps)` runs backwards. On the CPU, not clamped.

    refine: fixed-point iterations per step (0: plain DDIM inversion, one UNet call per step; k: 1 + k calls).
    The state is kept in the UNet's dtype, float32 at least: a float64 UNet and x0 give a float64 x_T. `batch_size`
    images go through the UNet at once; the result does not depend on it (up to float noise).
    """
    if num_steps < 1 or refine < 0 or batch_size < 1:
        raise ValueError(f"num_steps and batch_size must be at least 1 and refine at least 0 "
                         f"(got {num_steps}, {batch_size}, {refine})")
    if x0.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x0.shape)}")
    ddim = ddim_scheduler(scheduler, num_steps)
    inverse = inverse_scheduler(ddim)
    param = next(unet.parameters())
    device = torch.device(device) if device is not None else param.device
    state_dtype = torch.promote_types(param.dtype, torch.float32)
    timesteps = [int(t) for t in inverse.timesteps]
    was_training = unet.training
    unet.eval()
    out = []
    bar = progress_bar(total=-(-len(x0) // batch_size) * len(timesteps) * (1 + refine), desc=f"DDIM inversion {num_steps} steps",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for lo in range(0, len(x0), batch_size):
                x = x0[lo : lo + batch_size].to(device=device, dtype=state_dtype)
                for t in timesteps:
                    x = _invert_step(unet, ddim, inverse, x, t, refine, bar)
                out.append(x.cpu())
    finally:
        bar.close()
        unet.train(was_training)
    return torch.cat(out) if out else x0.new_zeros((0, *x0.shape[1:]), dtype=state_dtype)  # outside inference mode


def _invert_step(unet, ddim, inverse, x: torch.Tensor, t: int, refine: int, bar) -> torch.Tensor:
    """x_t from x, the point the sampler's step from t lands on: the plain step, then `refine` fixed-point iterations,
    each the model at (current guess, t) read as epsilon there (`predicted_epsilon`) and the step taken again from x."""
    dtype, alpha = next(unet.parameters()).dtype, ddim.alphas_cumprod[t]
    guess = x  # the first guess is x itself: plain DDIM inversion
    for _ in range(1 + refine):
        output = unet(guess.to(dtype), t).sample.to(x.dtype)
        guess = inverse.step(predicted_epsilon(output, guess, alpha, ddim.config.prediction_type), t, x).prev_sample
        bar.update(1)
    return guess
