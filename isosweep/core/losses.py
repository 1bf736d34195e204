"""The training loss of Isometric Diffusion: L = L_dsm + lambda_iso(p, t) L_iso (docs/math.md sections 3-4).

- `dsm_loss`: the denoising MSE of DDPM in the model's own parameterisation (`denoising_target`):
  epsilon (docs/math.md's L_dsm, the paper's and google/ddpm-* models), or v / x0 ("sample") for models
  whose scheduler config says so (the built-in shapes model predicts x0; docs/training.md says why).
  The isometry term acts on the encoder only and does not depend on the output parameterisation.
- `sample_timesteps`: the per-batch split. With probability p a batch's timesteps come from [0, pT)
  and the isometry loss is off; otherwise from [pT, T) and it is on. Overall t stays uniform on
  [0, T) (for pT an integer). The baseline (lambda_iso = 0 or p = 1) draws t uniformly, never turns
  the isometry loss on, and so costs exactly a plain denoising step.
- `IsoDiffusionLoss`: both terms for one micro-batch, as one callable `loss(model, unet, x0, t, noise,
  iso_on, alphas_cumprod, generator, t_iso=...)`, independent of the network it regularises. It also draws
  its own randomness: `coin(shared)` once per optimizer step (identical on every rank), `draw(x0, iso_on,
  generator, shared)` the timesteps and noise of each micro-batch.

Timesteps of the isometry term (`iso_timesteps`, `train.iso_timesteps`). The paper's Eq. 6 is a ratio of
expectations over x_t at one t, L_iso(e, t), and Eq. 7 weights it per t by lambda_iso(p, t).
- "per_timestep" (the default, the paper's form): `draw` gives each iso micro-batch one t_iso ~ U{pT..T-1},
  drawn from the `shared` generator (identical on every rank, after the coin), so all its samples, on every
  rank, share it: the ratio is Eq. 6 at t_iso, weighted by lambda_iso(p, t_iso) = lambda_iso. The isometry
  term is taken at x_{t_iso} = sqrt(abar) x_0 + sqrt(1 - abar) eps (the micro-batch's own x_0 and eps); the
  denoising term keeps its per-sample t, so L_dsm is unchanged.
- "pooled" (the public implementation, kept as an ablation): one ratio over the micro-batch's samples at
  their own t, i.e. the denoising t. It also ties the Jacobian scale E[Tr R] across timesteps. Its draws
  are today's, in the same order, so earlier runs reproduce.
`draw` takes from `generator` exactly what "pooled" takes, so the two differ only in the isometry term's t.

Isometry ratio under data parallelism: `reduction="global"` (the default, `train.iso_reduction`) takes
E[Tr R^2] / E[Tr R]^2 over the means all-reduced (differentiably) across DDP ranks, i.e. over the
global micro-batch: the faithful estimator. With "per_timestep" every rank takes its term at the same
t_iso, so this is Eq. 6's ratio of global means at one t. `"local"` uses each worker's own means (an
approximation whose bias grows as the per-worker batch shrinks). Either way the ratio is per micro-batch;
with gradient accumulation each micro-batch draws its own t_iso, and the step's L_iso is the mean of the
micro-batch ratios.

Cost levers (`train.iso_batch`, `train.iso_shared_forward`; measured in docs/benchmarks.md, "Scale: 256 px"):
- `iso_batch=k`: the isometry term uses the first k samples of each micro-batch (None: all of them), so its
  JVP/VJP cost and memory scale with k, not with the micro-batch. The ratio is then a ratio of means over k
  samples (over k x ranks with reduction="global": each rank takes its own first k): the same Eq. 6 estimator
  on a smaller sample, so more spread and, for very small k, the bias of a ratio of means (bench/scale.py
  --estimator measures both). The denoising term still uses the whole micro-batch.
- `share_forward=True`: the iso sub-batch's denoising prediction is finished (`hspace.decode`) from the
  encoder pass the JVP already runs (`encoder_at(..., with_skips=True)`), so those k samples' encoder runs
  once instead of twice; the rest of the micro-batch runs the ordinary forward. Exact for "pooled" (the same
  x_t and t). With "per_timestep" the shared samples must be denoised at t_iso: `draw` then gives the first
  k samples the denoising timestep t_iso instead of their own draw. Each such t is still ~ U{pT..T-1}, the
  law of a per-sample t in an iso micro-batch, so E[L_dsm] is unchanged (unbiased); only its variance grows a
  little, because those k samples share one t. Off by default, so existing specs train what they trained.
  The shared samples' denoising runs in float32 with the isometry term (outside autocast, math attention).
  Under DDP the rest of the micro-batch (at least one sample) carries the forward through the DDP wrapper.
- `iso_every=n` (lazy regularisation, as StyleGAN2 does for its R1 and path-length terms): the isometry term
  is taken only on optimizer steps whose index is a multiple of n (`due(step)`), weighted lambda_iso x n. The
  coin, and so the timestep range of every step, is drawn as before and independently of the step index, so
  E[gradient of the isometry part] per step is unchanged and its cost per step falls by n; what grows is the
  variance (one term n times larger every n steps). A skipped step draws its timesteps from the iso range as
  usual and costs a plain step. n = 1 (the default) is the paper's every-step loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from isosweep.core import geometry
from isosweep.core.hspace import decode, encoder_at  # runs each encoder call inside hspace.autodiff_safe
from isosweep.core.names import ISO_TIMESTEPS


def iso_cutoff(p: float, T: int) -> int:
    """The first timestep on which the isometry loss applies: round(pT), kept inside [0, T-1]."""
    return min(max(int(round(p * T)), 0), T - 1)


def is_baseline(lambda_iso: float, p: float) -> bool:
    """lambda_iso = 0 or p = 1: no isometry loss anywhere."""
    return lambda_iso == 0.0 or p >= 1.0 or math.isclose(p, 1.0)


def choose_iso(p: float, generator: torch.Generator | None = None) -> bool:
    """The per-batch coin: True (isometry loss on, t in [pT, T)) with probability 1 - p.

    Under DDP every rank must draw the same coin (the global isometry ratio is a collective), so the
    caller passes a generator seeded identically on all ranks.
    """
    return bool(torch.rand((), generator=generator).item() >= p)


def sample_timesteps(batch_size: int, p: float, T: int, generator: torch.Generator | None = None, *,
                     lambda_iso: float = 1.0, iso_on: bool | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, bool]:
    """Timesteps (batch_size,) long and whether the isometry loss is on for this batch.

    Baseline (lambda_iso = 0 or p = 1): t ~ U{0..T-1}, iso off. Otherwise, unless `iso_on` is given,
    flip `choose_iso(p)`; iso on: t ~ U{pT..T-1}; off: t ~ U{0..pT-1}. Drawn on the generator's device, then moved to
    `device`: a CPU generator gives what it always gave, a GPU generator draws on the GPU with no host read (the coin
    excepted: pass `iso_on`).
    """
    where = _drawn_on(generator)
    if is_baseline(lambda_iso, p):
        return torch.randint(0, T, (batch_size,), generator=generator, device=where).to(device), False
    cut = iso_cutoff(p, T)
    if iso_on is None:
        iso_on = choose_iso(p, generator)
    if cut == 0:
        iso_on = True  # p rounds to 0: every timestep is in the isometry range
    lo, hi = (cut, T) if iso_on else (0, cut)
    return torch.randint(lo, hi, (batch_size,), generator=generator, device=where).to(device), iso_on


def _drawn_on(generator: torch.Generator | None) -> torch.device | None:
    """Where a draw from `generator` is made: the generator's own device (then moved where it is used, a no-op when
    that is the same device: no host->device copy for a generator on the GPU); None (the CPU) without one."""
    return generator.device if generator is not None else None


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per sample."""
    a = _abar(alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t per sample, float32, shaped to broadcast over `like` (B, ...)."""
    return alphas_cumprod.to(device=like.device, dtype=torch.float32)[t].view(-1, *([1] * (like.dim() - 1)))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoising_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at x_t, as diffusers' schedulers read it (`prediction_type`).

    epsilon: eps; v_prediction: sqrt(abar_t) eps - sqrt(1 - abar_t) x_0; sample: x_0.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _abar(alphas_cumprod, t, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
    return x0


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the base model's scheduler has prediction_type={prediction_type!r}; "
                         f"isosweep trains {', '.join(PREDICTION_TYPES)}: use a model with one of those")


def dsm_loss(model, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising MSE against `target` (the noise for epsilon models), mean over batch and pixels (float32)."""
    return F.mse_loss(model(x_t, t).sample.float(), target.float())


class Draw(NamedTuple):
    """One micro-batch's randomness: denoising timesteps t (B,) long, noise (x0's shape), the iso switch,
    and the isometry term's timesteps t_iso ((B,) long, all equal) or None (pooled, or iso off: use t)."""

    t: torch.Tensor
    noise: torch.Tensor
    iso_on: bool
    t_iso: torch.Tensor | None


def shared_timestep(p: float, T: int, shared: torch.Generator) -> torch.Tensor:
    """One t ~ U{pT..T-1} from `shared` (the per-step generator seeded identically on every rank), as a (1,) long
    tensor on the generator's device: never read on the host, so a step drawing it on the GPU does not sync."""
    return torch.randint(iso_cutoff(p, T), T, (1,), generator=shared, device=shared.device)


@dataclass
class LossOutput:
    """One micro-batch's loss. Statistics are detached tensors (no device sync until they are read)."""

    loss: torch.Tensor  # scalar, with graph
    dsm: torch.Tensor  # scalar
    iso: torch.Tensor | None  # scalar L_iso (unweighted), None when off
    tr_r: torch.Tensor | None  # mean Tr(R) estimate over the local micro-batch, None when off
    iso_on: bool


class IsoDiffusionLoss:
    """L = L_dsm + lambda_iso * iso_every * 1[iso_on] * L_iso for one micro-batch (`iso_on`: the coin's range and,
    with lazy regularisation, a step `due` for the term); `iso_timesteps` (module docstring)
    chooses where `draw` puts the isometry term's timesteps.

    `model` runs the denoising forward (the DDP wrapper under data parallelism, so its reducer sees the
    forward); `unet` is the raw UNet2DModel the isometry term is computed on (for DDP, `model.module`:
    its parameters are the same tensors, so the single backward of the total loss accumulates both
    terms' gradients into the same `.grad` and the DDP hooks all-reduce the sum).
    The isometry term runs in float32 outside autocast (the trace ratio of a JVP/VJP pair is precision
    sensitive) through `hspace.encoder_at`, i.e. inside `hspace.autodiff_safe` (math attention,
    contiguous GroupNorm); the denoising forward keeps the fast attention kernels.
    """

    def __init__(self, *, lambda_iso: float, p: float, iso_metric: str = "stereographic",
                 reduction: str = "global", timesteps: int = 1000, prediction_type: str = "epsilon",
                 iso_timesteps: str = "per_timestep", iso_batch: int | None = None, share_forward: bool = False,
                 iso_every: int = 1) -> None:
        check_prediction_type(prediction_type)
        if iso_timesteps not in ISO_TIMESTEPS:
            raise ValueError(f"unknown iso_timesteps {iso_timesteps!r}; use one of {list(ISO_TIMESTEPS)}")
        if iso_batch is not None and (isinstance(iso_batch, bool) or not isinstance(iso_batch, int) or iso_batch < 1):
            raise ValueError(f"iso_batch must be a positive int or None (all samples); got {iso_batch!r}")
        if isinstance(iso_every, bool) or not isinstance(iso_every, int) or iso_every < 1:
            raise ValueError(f"iso_every must be a positive int (1: the isometry term on every step); got {iso_every!r}")
        self.lambda_iso, self.p, self.iso_metric, self.reduction, self.T = lambda_iso, p, iso_metric, reduction, timesteps
        self.prediction_type, self.iso_timesteps = prediction_type, iso_timesteps
        self.iso_batch, self.share_forward, self.iso_every = iso_batch, share_forward, iso_every

    @property
    def baseline(self) -> bool:
        return is_baseline(self.lambda_iso, self.p)

    def iso_samples(self, batch_size: int) -> int:
        """How many samples (the first ones) of a micro-batch of `batch_size` the isometry term uses."""
        return batch_size if self.iso_batch is None else min(self.iso_batch, batch_size)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based, counted over the whole run, so resume keeps the rhythm) takes the
        isometry term when its coin is on: every step, or every `iso_every`-th with lazy regularisation."""
        return step % self.iso_every == 0

    @property
    def iso_weight(self) -> float:
        """The isometry term's weight where it is taken: lambda_iso, times iso_every to keep its expectation."""
        return self.lambda_iso * self.iso_every

    def coin(self, shared: torch.Generator) -> bool:
        """This optimizer step's iso coin (False for the baseline, which never draws). `shared` must be
        seeded identically on every rank: the global isometry ratio is a collective. The coin is read on the host (it
        picks the step's timestep range): give it a CPU generator (`core.step.StepGenerators.coin`, which on the CPU
        is the shared generator itself)."""
        return not self.baseline and choose_iso(self.p, shared)

    def draw(self, x0: torch.Tensor, iso_on: bool, generator: torch.Generator,
             shared: torch.Generator | None = None, *, term: bool = True) -> Draw:
        """One micro-batch's `Draw` for x0 (B, C, H, W), on x0's device: timesteps from the range the coin
        chose, then the noise, both from `generator` (this rank's stream); with "per_timestep" and the
        isometry term on, then t_iso from `shared` (the generator `coin` used, identical on every rank).
        With `share_forward` and "per_timestep", the iso sub-batch (the first `iso_samples(B)`) is denoised at
        t_iso: its entries of t are set to t_iso (same draws, so the other samples keep theirs). `term=False` (a step
        that lazy regularisation skips, `due`) keeps the iso range's timesteps and noise and draws no t_iso.
        Each draw is made on its generator's device (`core.step.step_generators`): with GPU generators nothing is read
        on the host or copied from it; with CPU generators (the training loop's) the draws are what they always were."""
        t, iso_on = sample_timesteps(x0.shape[0], self.p, self.T, generator, lambda_iso=self.lambda_iso,
                                     iso_on=iso_on, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=_drawn_on(generator)).to(x0.device)
        if not iso_on or not term or self.iso_timesteps == "pooled":
            return Draw(t, noise, iso_on, None)
        if shared is None:
            raise ValueError("iso_timesteps='per_timestep' draws the isometry term's t from the generator shared by "
                             "every rank: pass it as `shared` (the one given to `coin`)")
        t_iso = shared_timestep(self.p, self.T, shared).to(t.device).expand_as(t).clone()
        if self.share_forward:
            t = t.clone()
            k = self.iso_samples(t.shape[0])
            t[:k] = t_iso[:k]
        return Draw(t, noise, iso_on, t_iso)

    def __call__(self, model, unet, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, iso_on: bool,
                 alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None, *,
                 t_iso: torch.Tensor | None = None, drawn: bool = False) -> LossOutput:
        """The loss at x_t = add_noise(x0, noise, t). The isometry term (when on) is taken on the first
        `iso_samples(B)` samples, at x_{t_iso} with the same x0 and noise when `t_iso` ((B,) long, from `draw`)
        is given, else at x_t itself. `generator` draws the Hutchinson probes (one per iso sample), on its device.
        `drawn=True` says t and t_iso come from this loss's `draw`, which already gave the shared samples t_iso: the
        share_forward check that compares them (a host read of device values) is then skipped, so the call reads
        nothing on the host."""
        target = denoising_target(self.prediction_type, x0, noise, t, alphas_cumprod)
        iso_on = iso_on and not self.baseline
        if not iso_on or not self.share_forward:
            dsm = dsm_loss(model, add_noise(x0, noise, t, alphas_cumprod), t, target)
            if not iso_on:
                return LossOutput(dsm, dsm.detach(), None, None, False)
        k = self.iso_samples(x0.shape[0])
        t_i = (t if t_iso is None else t_iso)[:k]
        x_i = add_noise(x0[:k], noise[:k], t_i, alphas_cumprod)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            if self.share_forward:
                if not drawn and not torch.equal(t_i, t[:k]):
                    raise ValueError("share_forward: the iso sub-batch must be denoised at the isometry term's t; "
                                     "take the timesteps from `draw` of a loss built with share_forward=True")
                tr_r, tr_r2, enc = geometry.isometry_terms(encoder_at(unet, t_i, with_skips=True), x_i.float(),
                                                           self.iso_metric, generator=generator, has_aux=True)
                pred_i = decode(unet, enc.h, enc.skips, enc.emb, enc.timesteps)
            else:
                tr_r, tr_r2 = geometry.isometry_terms(encoder_at(unet, t_i), x_i.float(), self.iso_metric, generator=generator)
            iso = geometry.isometry_ratio(tr_r, tr_r2, reduction=self.reduction)
        if self.share_forward:
            dsm = self._shared_dsm(model, unet, pred_i, x0, noise, t, target, k, alphas_cumprod)
        loss = dsm + self.iso_weight * iso
        return LossOutput(loss, dsm.detach(), iso.detach(), tr_r.detach().mean(), True)

    @staticmethod
    def _shared_dsm(model, unet, pred_i: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    target: torch.Tensor, k: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The micro-batch's denoising MSE (mean over all B samples and pixels) with the first k predictions
        `pred_i` taken from the isometry term's encoder pass and the other B - k from `model`."""
        b = x0.shape[0]
        total = F.mse_loss(pred_i.float(), target[:k].float(), reduction="sum")
        if k < b:
            rest = model(add_noise(x0[k:], noise[k:], t[k:], alphas_cumprod), t[k:]).sample
            total = total + F.mse_loss(rest.float(), target[k:].float(), reduction="sum")
        elif model is not unet:  # a DDP wrapper that never ran forward would not all-reduce the gradients
            raise ValueError(f"share_forward under DDP needs iso_batch below the micro-batch ({b}) so that the "
                             "other samples' forward runs through the DDP wrapper; lower train.iso_batch")
        return total / target.numel()
