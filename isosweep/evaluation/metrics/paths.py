"""Interpolation paths between latents and their relative length (docs/math.md section 5: PPL, mRTL)."""

from __future__ import annotations

import torch

__all__ = ["slerp", "slerp_tangent", "lerp", "relative_trajectory_length"]


def _as_batch_s(s: torch.Tensor | float, a: torch.Tensor) -> torch.Tensor:
    """s as a (B, 1, ..., 1) tensor broadcastable against a (B, ...)."""
    s = torch.as_tensor(s, dtype=torch.float64, device=a.device)
    if s.ndim == 0:
        s = s.expand(a.shape[0])
    if s.shape != (a.shape[0],):
        raise ValueError(f"s must be a scalar or of shape ({a.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (a.ndim - 1)))


def _pair_angles(a64: torch.Tensor, b64: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's angle omega, sin(omega) and whether slerp treats it as a lerp (sin(omega) < 1e-7), in `shape`."""
    af, bf = a64.flatten(1), b64.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-300)
    omega = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(shape)
    sin_omega = torch.sin(omega)
    return omega, sin_omega, sin_omega.abs() < 1e-7


def lerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Linear interpolation (1 - s) a + s b per pair: a, b (B, ...), s scalar or (B,) -> (B, ...)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    s64 = _as_batch_s(s, a)
    return ((1 - s64) * a.double() + s64 * b.double()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation per pair: a, b (B, ...), s scalar or (B,) -> (B, ...).

    Each pair uses its own angle omega_i = angle(a_i, b_i) (flattened):
    slerp = sin((1 - s) omega) / sin(omega) a + sin(s omega) / sin(omega) b. The ends are exact (s = 0
    gives a, s = 1 gives b) and for |a_i| = |b_i| every point has that norm. s outside [0, 1] extrapolates
    along the same great circle (PPL's s + eps). Pairs closer than 1e-7 rad fall back to lerp.
    Computed in float64, returned in a's dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    s64 = _as_batch_s(s, a)
    a64, b64 = a.double(), b.double()
    omega, sin_omega, near = _pair_angles(a64, b64, s64.shape)
    safe = torch.where(near, torch.ones_like(sin_omega), sin_omega)
    wa = torch.where(near, 1 - s64, torch.sin((1 - s64) * omega) / safe)
    wb = torch.where(near, s64, torch.sin(s64 * omega) / safe)
    return (wa * a64 + wb * b64).to(a.dtype)


def slerp_tangent(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """d slerp(a, b; s) / ds per pair: a, b (B, ...), s scalar or (B,) -> (B, ...), in a's dtype (computed in float64).

    omega / sin(omega) (cos(s omega) b - cos((1 - s) omega) a); b - a for pairs that `slerp` treats as a lerp.
    The velocity along PPL's path: with it, d(G(slerp(s)), G(slerp(s + eps))) / eps^2 has the limit that PPL by
    forward-mode differentiation takes.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    s64 = _as_batch_s(s, a)
    a64, b64 = a.double(), b.double()
    omega, sin_omega, near = _pair_angles(a64, b64, s64.shape)
    scale = torch.where(near, torch.ones_like(omega), omega / torch.where(near, torch.ones_like(sin_omega), sin_omega))
    wa = torch.where(near, -torch.ones_like(s64), -scale * torch.cos((1 - s64) * omega))
    wb = torch.where(near, torch.ones_like(s64), scale * torch.cos(s64 * omega))
    return (wa * a64 + wb * b64).to(a.dtype)


def relative_trajectory_length(path: torch.Tensor) -> torch.Tensor:
    """Path length over chord length: path (K+1, B, ...) -> (B,).

    RTL = sum_k |p[k+1] - p[k]| / |p[K] - p[0]| (Euclidean norms over the flattened feature axes).
    1 for points on a straight segment (in order), pi/2 for a half circle sampled finely. Computed in float64.
    """
    if path.ndim < 2 or path.shape[0] < 2:
        raise ValueError(f"path must be (K+1, B, ...) with K >= 1, got {tuple(path.shape)}")
    p = path.double().flatten(2)
    steps = (p[1:] - p[:-1]).norm(dim=2).sum(0)
    chord = (p[-1] - p[0]).norm(dim=1)
    return steps / chord
