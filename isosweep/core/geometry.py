"""The stereographic chart of the noise sphere and the isometry loss (docs/math.md sections 2-3).

A noisy sample x (any shape (B, ...), flattened to R^n) lies near the sphere of radius r = |x|.
The encoder e maps x to the bottleneck h. The loss asks the pull-back of the metric on H through
f = e o Pi^{-1} (Pi: stereographic projection from the north pole (0, ..., 0, r)) to be a scaled
isometry of the sphere's metric G(z) = g(z) I, with R = J^T J G^{-1}:

    L_iso = E[Tr(R^2)] / E[Tr(R)]^2  >=  1 / k,    k = min(n - 1, m),  m = dim H

R has rank at most k, so with m < n - 1 (the paper's UNets: m = 32,768, n - 1 = 196,607 at 256 px)
R = c I is out of reach: the minimum 1/m is met when each R's m non-zero eigenvalues are equal, with
one value for every x. The built-in shapes model has m = 4,096 > n - 1 = 3,071, so there the bound of the
sphere's metrics is 1/(n - 1) = 1/3,071, met by R = c I; for "ambient", R acts on R^n and k = min(n, m), so its
bound there is 1/n = 1/3,072.
The paper's Eq. 6 takes both expectations at one timestep t; the caller decides that by the batch
it passes (`losses.IsoDiffusionLoss`, `train.iso_timesteps`).

Because G is conformal, the chart never has to be built: with the tangent projector
P = I - x x^T / r^2 and A = J_e^T J_e,

    Tr(R)   = Tr(P A)      ~  |J_e u|^2          u = P v,  v ~ N(0, I_n)
    Tr(R^2) = Tr(P A P A)  ~  |P J_e^T J_e u|^2

which costs one forward-mode JVP of the encoder and one VJP with `create_graph=True`.

Metrics G (`metric=`):
    "stereographic"  the sphere's own metric (the paper's method)
    "identity"       G = I in the stereographic chart (the ablation): Tr(R) * g, Tr(R^2) * g^2
    "ambient"        no sphere: R = J_e^T J_e on R^n (u = v, nothing projected)

Reductions (`isometry_ratio`): "local" takes the ratio of this process's batch means; "global"
all-reduces the sums and counts over torch.distributed ranks first (differentiably), so every rank
holds the ratio of the global means, the faithful estimator under data parallelism (Eq. 6 at one t
when every rank's samples share that t).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.distributed.nn.functional import all_reduce

from isosweep.core.names import ISO_METRICS, REDUCTIONS

Encoder = Callable[[torch.Tensor], Any]


def _check_metric(metric: str) -> None:
    if metric not in ISO_METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {list(ISO_METRICS)}")


def _flat(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch of shape (B, ...) with at least 2 dims (got shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (got {x.dtype})")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] < 2:
        raise ValueError(f"{name} must have n >= 2 coordinates per sample (got n = {flat.shape[1]})")
    return flat


def stereographic(x: torch.Tensor) -> torch.Tensor:
    """Stereographic projection of each sample from the north pole of its own sphere.

    x: (B, ...) flattened to (B, n); r = |x| per sample; north pole N = (0, ..., 0, r).
    Returns z = x[:, :n-1] / (r - x[:, n-1]), shape (B, n-1). Undefined at the north pole itself.
    """
    flat = _flat(x)
    r = flat.norm(dim=1, keepdim=True)
    return flat[:, :-1] / (r - flat[:, -1:])


def inverse_stereographic(z: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
    """Inverse chart: z (B, n-1) and radius r (scalar, (B,) or (B, 1)) to x (B, n) on the sphere |x| = r.

    x = r / (|z|^2 + 1) * (2 z, |z|^2 - 1).
    """
    if z.dim() != 2:
        raise ValueError(f"z must have shape (B, n-1) (got {tuple(z.shape)})")
    r = torch.as_tensor(r, dtype=z.dtype, device=z.device)
    if r.dim() == 1:
        r = r[:, None]
    if r.dim() > 2 or (r.dim() == 2 and r.shape[1] != 1):
        raise ValueError(f"r must be a scalar, (B,) or (B, 1) (got shape {tuple(r.shape)})")
    sq = (z * z).sum(dim=1, keepdim=True)
    return r / (sq + 1) * torch.cat((2 * z, sq - 1), dim=1)


def conformal_factor(x: torch.Tensor) -> torch.Tensor:
    """g per sample, shape (B,): the sphere's metric in the chart is G(z) = g I.

    g = (r - x[n-1])^2 with r = |x|, which equals 4 r^2 / (1 + |z|^2)^2 at z = Pi(x).
    """
    flat = _flat(x)
    r = flat.norm(dim=1)
    return (r - flat[:, -1]) ** 2


def _tangent_project(flat_x: torch.Tensor, flat_v: torch.Tensor) -> torch.Tensor:
    """P v = v - x (x.v) / r^2 per sample; (B, n) each. x = 0 gives P = I."""
    r2 = (flat_x * flat_x).sum(dim=1, keepdim=True).clamp_min(torch.finfo(flat_x.dtype).tiny)
    return flat_v - flat_x * ((flat_x * flat_v).sum(dim=1, keepdim=True) / r2)


def isometry_terms(
    encoder: Encoder,
    x: torch.Tensor,
    metric: str = "stereographic",
    generator: torch.Generator | None = None,
    probes: torch.Tensor | None = None,
    has_aux: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, Any]:
    """Per-sample Hutchinson estimates of Tr(R) and Tr(R^2), each of shape (B,).

    encoder: maps x (B, ...) to h (B, ...); with `has_aux=True` it returns (h, aux) and aux (computed
        in the same forward pass, e.g. the UNet's skip connections) is returned third, still attached
        to the autograd graph. It must run on kernels that support forward-mode AD and double
        backward: for a diffusers UNet use `isosweep.core.hspace.encoder_at`, which handles that.
    x: (B, ...) points where the Jacobian is taken (treated as constants of the loss).
    metric: one of "stereographic", "identity", "ambient" (module docstring).
    generator: draws the probes v ~ N(0, I); ignored when `probes` is given.
    probes: optional v of x's shape (one probe per sample), for reproducible or exact-trace use.

    Cost: one forward-mode JVP (torch.func.jvp) and one VJP with create_graph=True. Both results
    are differentiable with respect to the encoder's parameters.
    """
    _check_metric(metric)
    if not callable(encoder):
        raise TypeError(f"encoder must be callable x -> h (got {type(encoder).__name__})")
    flat_x = _flat(x).detach()
    if probes is None:
        # drawn where the generator lives (training seeds CPU generators), then moved: the same probes on CPU and GPU
        v = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None else x.device,
                        dtype=x.dtype).to(x.device)
    else:
        if probes.shape != x.shape:
            raise ValueError(f"probes must have x's shape {tuple(x.shape)} (got {tuple(probes.shape)})")
        v = probes.to(device=x.device, dtype=x.dtype)
    flat_v = v.detach().reshape_as(flat_x)
    u = flat_v if metric == "ambient" else _tangent_project(flat_x, flat_v)
    u = u.reshape(x.shape)

    if not torch.is_grad_enabled():
        raise RuntimeError("isometry_terms needs autograd (a JVP and a VJP) but was called under torch.no_grad()")
    x_in = x.detach().requires_grad_(True)
    if has_aux:
        h, ju, aux = torch.func.jvp(encoder, (x_in,), (u,), has_aux=True)
    else:
        h, ju = torch.func.jvp(encoder, (x_in,), (u,))
    if not isinstance(h, torch.Tensor):
        raise TypeError("encoder must return a tensor h (or (h, aux) with has_aux=True)")
    if not h.requires_grad:
        raise ValueError("the encoder's output does not depend on x; nothing to regularise")
    tr_r = ju.reshape(ju.shape[0], -1).pow(2).sum(dim=1)

    # w = J_e^T (J_e u); create_graph keeps it differentiable for the training backward.
    (w,) = torch.autograd.grad(h, x_in, grad_outputs=ju, create_graph=True, allow_unused=True)
    if w is None:
        raise ValueError("the encoder's output does not depend on x; nothing to regularise")
    flat_w = w.reshape_as(flat_x)
    if metric != "ambient":
        flat_w = _tangent_project(flat_x, flat_w)
    tr_r2 = flat_w.pow(2).sum(dim=1)

    if metric == "identity":
        g = conformal_factor(flat_x)
        tr_r = tr_r * g
        tr_r2 = tr_r2 * g * g
    if has_aux:
        return tr_r, tr_r2, aux
    return tr_r, tr_r2


def _dist_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def isometry_ratio(tr_r: torch.Tensor, tr_r2: torch.Tensor, reduction: str = "local") -> torch.Tensor:
    """L_iso = mean(tr_r2) / mean(tr_r)^2 from per-sample terms (B,), as a scalar tensor.

    reduction="local": means over this process's samples (a per-worker approximation under DDP).
    reduction="global": sums and counts all-reduced over the default torch.distributed group with
        torch.distributed.nn.functional.all_reduce (differentiable), so every rank returns the ratio of
        the global means. Its backward sums the incoming gradients over ranks, so after DDP averages
        the parameter gradients they equal the exact gradient of the global ratio. Falls back to
        "local" when torch.distributed is not initialised or has one rank. Every rank must call it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {list(REDUCTIONS)}")
    if tr_r.shape != tr_r2.shape or tr_r.dim() != 1:
        raise ValueError(f"tr_r and tr_r2 must both have shape (B,) (got {tuple(tr_r.shape)} and {tuple(tr_r2.shape)})")
    if reduction == "global" and _dist_world_size() > 1:
        count = torch.tensor(float(tr_r.shape[0]), dtype=tr_r.dtype, device=tr_r.device)
        packed = torch.stack((tr_r.sum(), tr_r2.sum(), count))
        with warnings.catch_warnings():
            # deprecated in favour of a private module; it is the public differentiable collective
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(packed)
        mean_r, mean_r2 = total[0] / total[2], total[1] / total[2]
    else:
        if tr_r.shape[0] == 0:
            raise ValueError("empty batch: cannot average zero samples")
        mean_r, mean_r2 = tr_r.mean(), tr_r2.mean()
    return mean_r2 / mean_r**2


def isometry_loss(
    encoder: Encoder,
    x: torch.Tensor,
    metric: str = "stereographic",
    generator: torch.Generator | None = None,
    *,
    probes: torch.Tensor | None = None,
    reduction: str = "local",
) -> torch.Tensor:
    """Scalar L_iso = mean(Tr(R^2)) / mean(Tr(R))^2 over the batch x (B, ...).

    Scale-free (rescaling h leaves it unchanged). Its exact value (the traces instead of their
    one-probe estimates) is at least 1/k, k = min(n-1, m) the largest rank R can have (m = dim h; n for
    "ambient"), reached exactly when every R has k equal non-zero eigenvalues, with one value for every x;
    with m < n-1, R = c I cannot be reached. Eq. 6 of the paper when all of x share one timestep.
    See `isometry_terms` for the arguments and `isometry_ratio` for `reduction`.
    """
    tr_r, tr_r2 = isometry_terms(encoder, x, metric=metric, generator=generator, probes=probes)
    return isometry_ratio(tr_r, tr_r2, reduction=reduction)
