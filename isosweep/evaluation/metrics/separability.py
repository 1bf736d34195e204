"""Linear separability of attributes in the latents x_T (Karras et al. 2019; MATH.md section 5).

For every attribute: keep the most confident samples (by the attribute classifier's confidence), fit an
SVM on the latents to predict the classifier's label, and measure the conditional entropy H(Y | X) of the
label Y given the SVM's prediction X on those same samples (as StyleGAN's code does). LS = exp(sum_i
H(Y_i | X_i)) with entropies in nats: 1 when every attribute is perfectly separable, 2 per balanced
binary attribute independent of the latents.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import numpy as np
import torch
from sklearn.svm import SVC, LinearSVC

from isosweep.core.sampling import Sampler, initial_noise

__all__ = ["conditional_entropy", "linear_separability", "classify_samples", "ls_scores"]

Classifier = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# images (B, C, H, W) in [-1, 1] -> (labels (B, A) long, confidence (B, A) float in [0, 1])


def conditional_entropy(y: np.ndarray, x: np.ndarray) -> float:
    """H(Y | X) in nats from paired discrete samples y, x (N,): sum_{x,y} p(x, y) log(p(x) / p(x, y))."""
    y, x = np.asarray(y), np.asarray(x)
    _, yi = np.unique(y, return_inverse=True)
    _, xi = np.unique(x, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1.0)
    joint /= joint.sum()
    px = joint.sum(axis=1, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log((px * np.ones_like(joint))[nz] / joint[nz])).sum())


def _fit_predict(z: np.ndarray, y: np.ndarray, kernel: str, seed: int) -> np.ndarray:
    if kernel == "linear":
        svm = LinearSVC(C=1.0, dual="auto", max_iter=10000, random_state=seed)
    elif kernel == "rbf":
        svm = SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed)
    else:
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinearSVC convergence warnings on inseparable labels
        svm.fit(z, y)
    return svm.predict(z)


def linear_separability(
    latents: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    kernel: Literal["linear", "rbf"] = "linear",
    *,
    confidence: np.ndarray | torch.Tensor | None = None,
    keep: int | None = None,
    seed: int = 0,
) -> float:
    """LS = exp(sum_i H(Y_i | X_i)).

    latents (N, d) (flattened if more dims); labels (N, A) integer classes, one column per attribute;
    confidence (N, A): with `keep`, only the `keep` most confident samples of each attribute are used.
    An attribute with a single class among the kept samples contributes 0.
    """
    z = np.asarray(latents, np.float64).reshape(len(latents), -1)
    y = np.asarray(labels)
    if y.ndim == 1:
        y = y[:, None]
    if len(y) != len(z):
        raise ValueError(f"latents ({len(z)}) and labels ({len(y)}) differ in length")
    conf = None if confidence is None else np.asarray(confidence, np.float64).reshape(y.shape)
    total = 0.0
    for a in range(y.shape[1]):
        idx = np.arange(len(z))
        if keep is not None and keep < len(z):
            if conf is None:
                raise ValueError("keep needs confidence")
            idx = np.sort(np.argsort(-conf[:, a], kind="stable")[:keep])
        ya = y[idx, a]
        if np.unique(ya).size < 2:
            continue
        total += conditional_entropy(ya, _fit_predict(z[idx], ya, kernel, seed))
    return float(np.exp(total))


@torch.inference_mode()
def classify_samples(
    sampler: Sampler,
    classifier: Classifier,
    *,
    num_samples: int,
    ddim_steps: int,
    seed: int,
    shape: tuple[int, ...],
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Classifier labels (n, A) and confidences (n, A) of generated samples start..stop-1 (latents: stream 0
    of `seed`, the same latents as the FID samples)."""
    stop = num_samples if stop is None else min(stop, num_samples)
    labs, confs = [], []
    for lo in range(start, stop, batch_size):
        n = min(batch_size, stop - lo)
        imgs = sampler(initial_noise(n, shape, seed, start=lo), ddim_steps).images
        lab, conf = classifier(imgs)
        labs.append(lab.cpu().numpy())
        confs.append(conf.float().cpu().numpy())
    return np.concatenate(labs), np.concatenate(confs)


def ls_scores(
    latents: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    confidence: np.ndarray,
    *,
    keep: int,
    kernels: tuple[str, ...] = ("linear", "rbf"),
    seed: int = 0,
) -> dict[str, float]:
    """{"ls": ..., "ls_rbf": ...} for the kernels asked, each on the `keep` most confident per attribute."""
    out = {}
    for k in kernels:
        out["ls" if k == "linear" else f"ls_{k}"] = linear_separability(latents, labels, k, confidence=confidence, keep=keep, seed=seed)
    return out
