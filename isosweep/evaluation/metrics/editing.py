"""How linear and how consistent Local Basis edits are (`core.editing`): the paper's Fig. 7, as numbers.

Distances are the square root of the perceptual distance PPL uses (LPIPS, or the domain network's): both are
squared weighted L2 distances between normalised features, so their root is a metric (the triangle inequality
holds) and grows in proportion to the step for a smooth edit, where the distance itself grows as its square.

- linearity, per edited direction: the distance r(gamma) of each edited image from the unedited one should grow in
  proportion to |gamma|. `linearity_r2` is the R^2 of the least-squares line of r against |gamma| over the
  unedited image (0, 0) and every edited column, both signs pooled: 1 = exactly proportional, lower when the
  change jumps at the first step, saturates, or differs between the two signs.
- straightness, per edited direction: the chord over the path, r(first, last) / the sum of r between neighbouring
  columns, in (0, 1]: 1 = the images move along a straight line in the distance's feature space.
- consistency, across samples: `subspace_agreement` of two samples' top-k directions, ||V_a^T V_b||_F^2 / k, the
  mean squared cosine of their principal angles: 1 when the k directions span the same subspace of X at both
  samples, k / dim X on average for unrelated random subspaces (`chance_agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from isosweep.core.editing import LocalBasis, ddim_steps, edited_states, unet_local_basis

__all__ = ["linearity_r2", "straightness", "subspace_agreement", "chance_agreement", "agreement_per_sample",
           "EditedSample", "edit_sample"]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # PPL's perceptual distance: (B, 3, H, W) x 2 -> (B,)


def linearity_r2(gammas: np.ndarray, distances: np.ndarray) -> float:
    """R^2 of r = a |gamma| + b over the point (0, 0) and the edited columns (gamma != 0), r the root distance from
    the unedited image; NaN when every distance is equal (nothing to explain)."""
    gammas, distances = np.asarray(gammas, dtype=np.float64), np.asarray(distances, dtype=np.float64)
    keep = gammas != 0
    x, y = np.append(0.0, np.abs(gammas[keep])), np.append(0.0, distances[keep])
    if np.ptp(y) == 0:
        return float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return float(1.0 - (residual @ residual) / ((y - y.mean()) @ (y - y.mean())))


def straightness(neighbour_distances: np.ndarray, chord: float) -> float:
    """chord / path: the root distance between the two end columns over the summed root distances between
    neighbours, at most 1 for a metric; NaN when the path has zero length."""
    path = float(np.sum(np.asarray(neighbour_distances, dtype=np.float64)))
    return float(chord) / path if path > 0 else float("nan")


def subspace_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / k for two sets of k orthonormal directions (k, *shape): the mean squared cosine of the
    principal angles between their spans, in [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"the two bases differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[0]
    cross = a.reshape(k, -1).double() @ b.reshape(k, -1).double().T
    return float((cross**2).sum() / k)


def chance_agreement(k: int, dim: int) -> float:
    """The expected `subspace_agreement` of two independent uniformly random k-dimensional subspaces of R^dim."""
    return k / dim


def agreement_per_sample(bases: list[torch.Tensor]) -> np.ndarray:
    """For each sample, its mean `subspace_agreement` with every other sample's basis: (n,), n >= 2."""
    n = len(bases)
    if n < 2:
        raise ValueError("consistency needs the bases of two samples at least")
    pair = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            pair[i, j] = pair[j, i] = subspace_agreement(bases[i], bases[j])
    return (pair.sum(axis=1) - 1.0) / (n - 1)


@dataclass
class EditedSample:
    """One sample's edits: its Local Basis, the unedited image (C, H, W), the grid (rows, columns, C, H, W) in
    [-1, 1] on the CPU, and per row {direction, distances, linearity_r2, straightness}."""

    basis: LocalBasis
    base: torch.Tensor
    grid: torch.Tensor
    rows: list[dict]


def edit_sample(unet: torch.nn.Module, ddim, timesteps: Sequence[int], at: int, x_T: torch.Tensor, k: int,
                directions: Sequence[int], gammas: np.ndarray, distance: Distance, *, combine: Sequence[int] | None = None,
                iterations: int = 8, batch_size: int = 16, vectors_per_pass: int | None = None) -> EditedSample:
    """Edit one sample x_T (1, C, H, W) at step `at` of the set DDIM schedule `ddim` (`timesteps`, highest first):
    its top-k Local Basis at x_t, x_t + gamma v drawn on for each of `directions` (then the normalised sum of
    `combine`) and each gamma, and each row measured with the root of `distance`."""
    x_t = ddim_steps(unet, ddim, x_T, timesteps[:at])
    basis = unet_local_basis(unet, x_t, timesteps[at], k, iterations=iterations, vectors_per_pass=vectors_per_pass)
    rows = [basis.directions[i] for i in directions]
    labels = [str(i) for i in directions]
    if combine:
        rows.append(sum(basis.directions[i] for i in combine) / len(combine) ** 0.5)  # orthonormal: unit norm
        labels.append("+".join(str(i) for i in combine))
    states = torch.cat([x_t, edited_states(x_t, torch.stack(rows), torch.as_tensor(gammas))])
    drawn = torch.cat([ddim_steps(unet, ddim, chunk, timesteps[at:]) for chunk in states.split(batch_size)])
    drawn = drawn.float().clamp(-1, 1).cpu()
    base, grid = drawn[0], drawn[1:].reshape(len(rows), len(gammas), *drawn.shape[1:])
    numbers = []
    with torch.no_grad():
        for label, row in zip(labels, grid):
            from_base = _root(distance, row, base.expand_as(row))
            chord = float(_root(distance, row[-1:], row[:1])[0])
            numbers.append({"direction": label, "distances": [float(d) for d in from_base],
                            "linearity_r2": linearity_r2(gammas, from_base),
                            "straightness": straightness(_root(distance, row[1:], row[:-1]), chord)})
    return EditedSample(basis, base, grid, numbers)


def _root(distance: Distance, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The square root of PPL's perceptual distance, a metric (see the module's docstring): (B,) float64."""
    return distance(a, b).double().clamp_min(0).sqrt().cpu().numpy()
