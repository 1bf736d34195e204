"""Local Basis editing (Park et al., 2023; the paper's Section 4.3): directions in X from the encoder's Jacobian.

At the DDIM state x_t of one image, the encoder e_t: X -> H (the UNet's bottleneck, `core.hspace.encode`) has the
Jacobian J = de_t/dx_t. Its right singular vectors v_1, v_2, ... (largest singular value first) are the Local
Basis: unit directions in X, orthogonal in X, that move h the most, v_i moving h along the left singular vector u_i
by sigma_i per unit step. An edit is x_t + gamma v_i, drawn on from t to 0 by the same DDIM schedule. The paper's
claim: after isometric fine-tuning such edits change the image more linearly and more consistently across samples
(`evaluation.metrics.editing` measures both).

J is never formed (196,608 x 32,768 at 256 px). The top k come from subspace iteration on J^T J: each round one
forward-mode product J V and one reverse-mode product J^T (J V) for the k + oversample vectors at once (the image
repeated, one vector per copy: the encoder treats samples independently), then Rayleigh-Ritz. `residuals` say
how far each vector is from exact, ||J^T J v - sigma^2 v|| / sigma^2.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from isosweep.core.hspace import autodiff_safe, encode

__all__ = ["LocalBasis", "local_basis", "unet_local_basis", "edit_step_index", "ddim_steps", "edited_states"]

Encoder = Callable[[torch.Tensor], torch.Tensor]  # x (B, *in_shape) -> h (B, *out_shape), samples independent


class LocalBasis(NamedTuple):
    """The top-k Local Basis of one sample: directions (k, *x_shape), unit norm, orthogonal; singular values (k,),
    largest first; residuals (k,), ||J^T J v - sigma^2 v|| / sigma^2 (0 when exact)."""

    directions: torch.Tensor
    singular_values: torch.Tensor
    residuals: torch.Tensor


def local_basis(encoder: Encoder, x: torch.Tensor, k: int, *, iterations: int = 8, oversample: int = 4,
                seed: int = 0, vectors_per_pass: int | None = None) -> LocalBasis:
    """The top-k right singular vectors of J = d encoder / dx at x (1, *shape), by subspace iteration.

    The start is a seeded Gaussian block of k + oversample vectors; each of `iterations` rounds multiplies it by
    J^T J and re-orthonormalises it. The error of the k-th vector shrinks as (sigma_{k+p+1} / sigma_k)^(2 rounds);
    `residuals` report it. Each vector's sign is fixed (its largest entry positive) so that a direction is
    reproducible from (model, x, seed). `vectors_per_pass` (default: all) bounds the memory: the encoder runs on
    that many copies of x at once; with fewer than all, each round runs the encoder's forward pass again per pass
    (docs/editing.md has the memory per vector)."""
    if x.shape[0] != 1:
        raise ValueError(f"local_basis takes one sample, (1, ...); got a batch of {x.shape[0]}")
    shape, n = x.shape[1:], x[0].numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n} (the dimension of X), got {k}")
    m = min(k + oversample, n)
    gram = _Gram(encoder, x.detach().clone(), vectors_per_pass or m, keep=(vectors_per_pass or m) >= m)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    basis = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q.to(device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        basis = torch.linalg.qr(gram.jtj(basis.T.reshape(m, *shape)).reshape(m, n).T).Q
    jv = gram.j(basis.T.reshape(m, *shape))  # Rayleigh-Ritz: J V = U S W^T, so V W holds J V's right singular vectors
    _, s, wt = torch.linalg.svd(jv.reshape(m, -1).T.double(), full_matrices=False)
    vectors = (basis.double() @ wt.T)[:, :k]
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
    directions = (vectors * signs).to(x.dtype).T.reshape(k, *shape).detach()
    s = s[:k].detach()
    jtjv = gram.jtj(directions).reshape(k, -1).double()  # the residuals: one more round's products
    sq = (s.double() ** 2).unsqueeze(1)
    gap = (jtjv - sq * directions.reshape(k, -1).double()).norm(dim=1)
    residuals = gap / sq.squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
    return LocalBasis(directions, s.to(x.dtype), residuals.detach().to(x.dtype))


class _Gram:
    """J V and J^T J V for blocks of vectors (c, *shape), `per_pass` copies of x through the encoder at a time. With
    `keep`, the reverse pass of the first block's copies is kept and reused (one forward pass in all)."""

    def __init__(self, encoder: Encoder, x: torch.Tensor, per_pass: int, keep: bool) -> None:
        self.encoder, self.x, self.per_pass, self.keep = encoder, x, max(1, int(per_pass)), keep
        self._kept: dict[int, tuple] = {}

    def _copies(self, c: int) -> torch.Tensor:
        return self.x.expand(c, *self.x.shape[1:]).contiguous()

    def _pullback(self, c: int):
        if self.keep and c in self._kept:
            return self._kept[c]
        h, pullback = torch.func.vjp(self.encoder, self._copies(c))
        if self.keep:
            self._kept = {c: (h.shape, pullback)}
        return h.shape, pullback

    def j(self, vectors: torch.Tensor) -> torch.Tensor:
        """J v for each vector: (c, *out_shape)."""
        return torch.cat([torch.func.jvp(self.encoder, (self._copies(len(block)),), (block.contiguous(),))[1].detach()
                          for block in vectors.split(self.per_pass)])

    def jtj(self, vectors: torch.Tensor) -> torch.Tensor:
        """J^T J v for each vector: (c, *shape)."""
        out = []
        for block in vectors.split(self.per_pass):
            jv = torch.func.jvp(self.encoder, (self._copies(len(block)),), (block.contiguous(),))[1]
            out.append(self._pullback(len(block))[1](jv)[0].detach())
        return torch.cat(out)


def unet_local_basis(unet: torch.nn.Module, x_t: torch.Tensor, t: int, k: int, **kwargs) -> LocalBasis:
    """`local_basis` of the UNet's encoder e_t at x_t (1, C, H, W), the UNet in eval mode and autodiff-safe."""
    was_training = unet.training
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.eval()
    timestep = torch.tensor(int(t), device=x_t.device)
    try:  # weights that require grad would make every product record (and keep) a graph for them too
        for p in trainable:
            p.requires_grad_(False)
        with autodiff_safe(unet), torch.enable_grad():
            return local_basis(lambda x: encode(unet, x, timestep), x_t, k, **kwargs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        unet.train(was_training)


def edit_step_index(timesteps: Sequence[int], t: int) -> int:
    """Where in a DDIM schedule (timesteps, highest first) an edit at timestep t happens: the first step whose
    timestep is at most t (x_T itself when t is at or above the first). ValueError when t is below every step."""
    for i, step in enumerate(timesteps):
        if int(step) <= int(t):
            return i
    raise ValueError(f"t={t} is below the last DDIM timestep {int(timesteps[-1])}; choose t >= {int(timesteps[-1])}")


@torch.no_grad()  # not inference mode: the state feeds the Jacobian products of `local_basis`
def ddim_steps(unet: torch.nn.Module, ddim, x: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """Deterministic DDIM steps from x over `timesteps` (a run of the set schedule `ddim`), as `ddim_sample` takes
    them: x_t in float32 at least, eta = 0. Returns the state after the last step (not clamped)."""
    dtype = next(unet.parameters()).dtype
    state = x.to(torch.promote_types(dtype, torch.float32))
    for t in timesteps:
        state = ddim.step(unet(state.to(dtype), int(t)).sample.to(state.dtype), int(t), state, eta=0.0).prev_sample
    return state


def edited_states(x_t: torch.Tensor, directions: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """x_t + gamma v for every direction (rows) and gamma (columns): (rows * columns, *x_shape), row-major."""
    rows, cols = directions.shape[0], gammas.shape[0]
    steps = gammas.to(x_t).reshape(1, cols, *([1] * (x_t.dim() - 1))) * directions.to(x_t).unsqueeze(1)
    return (x_t.unsqueeze(0) + steps).reshape(rows * cols, *x_t.shape[1:])
