"""Singular values of the encoder Jacobian J_e(x_t) and the MCN / VoR statistics (docs/math.md section 5).

The Jacobian of every sample is built at once, never with a Python loop over outputs:

- `vjp`: one forward of the whole batch, then `torch.func.vmap` over `torch.func.vjp` with one-hot
  cotangents e_j broadcast to every sample (the encoder treats samples independently, so one cotangent
  row gives row j of all B Jacobians), in chunks of rows sized to a memory budget;
- `jvp`: the same with `vmap` over forward-mode `torch.func.jvp` and one-hot tangents (columns); cheaper
  when inputs are fewer than outputs;
- `batched`: no functorch: the batch is repeated c times, one forward and one backward with block
  one-hot cotangents give c rows of every Jacobian, through the ordinary (well-tuned) batched kernels;
- `loop`: the reference, `torch.autograd.functional.jacobian` per sample (a loop over outputs).

`method="auto"` picks per device from the measurements in docs/benchmarks.md (see `choose_method`).
The encoder must treat samples independently (no batch statistics: eval-mode GroupNorm is fine).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from isosweep.core.hspace import autodiff_safe, encode

__all__ = [
    "unet_encoder",
    "autodiff_context",
    "pooled_encoder",
    "batched_jacobian",
    "looped_jacobian",
    "jacobian_singular_values",
    "choose_method",
    "condition_numbers",
    "mcn",
    "vor",
]

Encoder = Callable[[torch.Tensor], torch.Tensor]  # x (B, *in_shape) -> h (B, *out_shape)
Method = Literal["auto", "vjp", "jvp", "batched", "loop"]


def autodiff_context(unet: torch.nn.Module):
    """`isosweep.core.hspace.autodiff_safe(unet)`: math SDPA and contiguous GroupNorm, needed for vmap/jvp."""

    return autodiff_safe(unet)


def unet_encoder(unet: torch.nn.Module, t: int) -> Encoder:
    """e_t: x (B, C, H, W) -> h (B, C', H', W'), the bottleneck of a diffusers UNet2DModel at timestep t
    (`isosweep.core.hspace.encode`). Run it inside `autodiff_context(unet)` for the vjp/jvp methods."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return encode(unet, x, torch.tensor(t, device=x.device))

    return fn


def pooled_encoder(encoder: Encoder, pool: int | None) -> Encoder:
    """x (B, ...) -> flattened (B, m'): h average-pooled with kernel = stride = `pool` when h is (B, C, H, W).

    pool None (or 1) means no pooling; pooling a non-spatial h is an error."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        h = encoder(x)
        if pool is not None and pool > 1:
            if h.ndim != 4:
                raise ValueError(f"pool={pool} needs a (B, C, H, W) encoder output, got {tuple(h.shape)}; pass pool=None")
            h = F.avg_pool2d(h, kernel_size=pool, stride=pool)
        return h.flatten(1)

    return fn


def _activation_bytes(fn: Encoder, x: torch.Tensor) -> int:
    """Bytes autograd saves for one forward of fn on x (a proxy for the memory of one backward)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_(True))
    return sum(seen.values())


def _chunk_for_budget(fn: Encoder, x: torch.Tensor, total: int, memory_budget_mb: float) -> int:
    """Rows (or columns) per chunk so that one chunk's backward stays within the budget."""
    per_row = 2 * _activation_bytes(fn, x) + 2 * x.numel() * x.element_size()
    return int(max(1, min(total, (memory_budget_mb * 2**20) // max(per_row, 1))))


def choose_method(n_in: int, n_out: int, device: torch.device) -> str:
    """The fastest construction measured on each device type (docs/benchmarks.md, bench/jacobian.py).

    Forward mode needs one pass per input, reverse mode one per output: jvp when n_in < n_out.
    On accelerators vmap over VJPs fills the device; on the CPU the repeated-batch form uses the
    ordinary conv kernels and beat vmap (whose batching rules fall back to slower paths) and the loop.
    """
    if n_in < n_out:
        return "jvp"
    return "vjp" if device.type != "cpu" else "batched"


def looped_jacobian(fn: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Reference: torch.autograd.functional.jacobian of every sample separately (default: a loop over
    outputs). x (B, *in) -> (B, m, n)."""
    rows = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda xi: fn(xi.unsqueeze(0))[0], x[b].detach())
        rows.append(J.reshape(J.shape[0], -1))
    return torch.stack(rows)


def _rows_vjp(fn: Encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    B = x.shape[0]
    with torch.enable_grad():
        y, vjp_fn = torch.func.vjp(fn, x)
    m = y.shape[1]
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    out = []
    for lo in range(0, m, chunk):
        cot = eye[lo : lo + chunk].unsqueeze(1).expand(-1, B, -1)  # (c, B, m): e_j for every sample
        (g,) = torch.func.vmap(vjp_fn)(cot)  # (c, B, *in)
        out.append(g.flatten(2).transpose(0, 1).detach())  # (B, c, n)
    return torch.cat(out, dim=1)


def _cols_jvp(fn: Encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    B = x.shape[0]
    n = x[0].numel()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    out = []
    for lo in range(0, n, chunk):
        tan = eye[lo : lo + chunk].reshape(-1, 1, *x.shape[1:]).expand(-1, B, *x.shape[1:])  # (c, B, *in)
        cols = torch.func.vmap(lambda v: torch.func.jvp(fn, (x,), (v,))[1])(tan)  # (c, B, m)
        out.append(cols.permute(1, 2, 0).detach())  # (B, m, c)
    return torch.cat(out, dim=2)


def _rows_batched(fn: Encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    B = x.shape[0]
    with torch.no_grad():
        m = fn(x[:1]).shape[1]
    out = []
    for lo in range(0, m, chunk):
        c = min(chunk, m - lo)
        xr = x.detach().repeat(c, *([1] * (x.ndim - 1))).requires_grad_(True)  # (c*B, *in), copy j = rows j
        with torch.enable_grad():
            y = fn(xr)  # (c*B, m)
            cot = torch.zeros_like(y)
            idx = torch.arange(c, device=y.device).repeat_interleave(B)
            cot[torch.arange(c * B, device=y.device), lo + idx] = 1.0
            (g,) = torch.autograd.grad(y, xr, cot)
        out.append(g.reshape(c, B, -1).transpose(0, 1))  # (B, c, n)
    return torch.cat(out, dim=1)


def batched_jacobian(
    fn: Encoder,
    x: torch.Tensor,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    memory_budget_mb: float = 2048,
) -> torch.Tensor:
    """Jacobian of every sample: fn maps x (B, *in) to (B, m); returns (B, m, n), n = prod(in).

    chunk_size: rows (vjp, batched) or columns (jvp) per vectorised pass; None sizes it to
    memory_budget_mb from the activations one forward saves.
    """
    x = x.detach()
    with torch.no_grad():
        m = fn(x[:1]).shape[1]
    n = x[0].numel()
    if method == "auto":
        method = choose_method(n, m, x.device)
    if method == "loop":
        return looped_jacobian(fn, x)
    total = n if method == "jvp" else m
    chunk = chunk_size or _chunk_for_budget(fn, x, total, memory_budget_mb)
    if method == "vjp":
        return _rows_vjp(fn, x, chunk)
    if method == "jvp":
        return _cols_jvp(fn, x, chunk)
    if method == "batched":
        return _rows_batched(fn, x, chunk)
    raise ValueError(f"unknown method {method!r}; use auto, vjp, jvp, batched or loop")


def jacobian_singular_values(
    encoder: Encoder,
    x: torch.Tensor,
    pool: int | None = 2,
    chunk_size: int | None = None,
    method: Method = "auto",
    memory_budget_mb: float = 2048,
) -> torch.Tensor:
    """Singular values of J_e at each sample, largest first: x (B, *in) -> (B, k), k = min(m', n).

    encoder: x (B, *in) -> h (B, ...), samples independent. pool: average-pool kernel on a (B, C, H, W)
    h before flattening (docs/math.md section 1), None for none. The SVD runs in float64.
    """
    fn = pooled_encoder(encoder, pool)
    J = batched_jacobian(fn, x, method=method, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
    return torch.linalg.svdvals(J.double())


def condition_numbers(svals: torch.Tensor) -> torch.Tensor:
    """sigma_max / sigma_min of every sample: svals (N, k), largest first -> (N,) float64."""
    svals = torch.as_tensor(svals, dtype=torch.float64)
    return svals[:, 0] / svals[:, -1]


def mcn(svals: torch.Tensor) -> float:
    """Mean condition number: mean over samples of sigma_max / sigma_min. svals (N, k), largest first."""
    return float(condition_numbers(svals).mean())


def vor(svals: torch.Tensor, norm: str = "global_mean") -> float:
    """Variance of the Riemannian metric (Eq. 11): sum_i Var_x[sigma_i / c].

    norm = "global_mean" (the default, evaluation.jacobian.vor_norm): c is ONE scalar, the mean of all singular
    values over the whole evaluation set (all samples, all i), so rescaling h leaves VoR unchanged and a scaled
    isometry (all sigma_i equal, at every x) gives 0. norm = "paper": c = 1, Eq. 11 on the raw singular values
    (docs/math.md section 5), which scales with |h|^2: compare it only between models whose h have one scale.
    Var is the population variance over samples (ddof = 0). svals (N, k), N = the whole evaluation set (gather
    shards first).
    """
    svals = torch.as_tensor(svals, dtype=torch.float64)
    if norm not in ("global_mean", "paper"):
        raise ValueError(f"unknown vor_norm {norm!r}; use global_mean or paper")
    scaled = svals / svals.mean() if norm == "global_mean" else svals
    return float(scaled.var(dim=0, unbiased=False).sum())
