"""Linear separability of attributes (LS; Karras et al. 2019, docs/math.md section 5), scored on held-out samples.

For every attribute: keep the `keep` most confident samples (by the attribute classifier's confidence),
split them, stratified by label and seeded, into a fit part and a held-out part (`heldout` of them), fit an
SVM on the fit part's latents to predict the classifier's label Y, and measure the conditional entropy
H(Y | X) of Y given the SVM's prediction X on the held-out part. LS = exp(sum_i H(Y_i | X_i)) with
entropies in nats, i.e. 2 ** (sum of the entropies in bits): 1 when every attribute is predicted exactly
on samples the SVM never saw; 2 per balanced binary attribute (k per uniform k-class one) that the
latents do not predict.

Why held out: StyleGAN's code scores the SVM on the samples it was fitted on. With d-dimensional latents
and n <= d samples (x_T has 3,072 to 196,608 dimensions, LS keeps about 1,000) a hyperplane separates any
labelling, so same-sample LS is 1 for every model. `heldout=0` keeps that scoring for comparison only.

Spaces (`ls_scores`): "x_T", the initial latents (the paper's; results `ls`, `ls_rbf`) and "h", the UNet
bottleneck at the first DDIM step of the same samples (`ls_h`, `ls_h_rbf`). `ls_max` = exp(sum_i H(Y_i)) on
the same held-out samples bounds them all: a model whose attributes are less diverse has a lower LS without
being more separable.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from isosweep.core.names import LS_SPACES
from isosweep.core.sampling import initial_noise
from isosweep.evaluation.metrics.samples import SampleRange

__all__ = ["conditional_entropy", "heldout_split", "linear_separability", "ls_max", "classify_samples", "ls_name", "ls_scores"]

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


def heldout_split(labels: np.ndarray, fraction: float, seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) sorted index arrays of n = len(labels) samples, stratified by label.

    round(fraction * n) samples are held out, at least one in each part when n >= 2; each class is split
    in proportion (within one sample), its members in a seeded random order. Depends only on (labels,
    fraction, seed).
    """
    y = np.asarray(labels).reshape(-1)
    n = len(y)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout fraction must lie in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    n_out = min(max(round(fraction * n), 1), n - 1)
    key = np.empty(n)
    for c in np.unique(y):  # evenly spaced keys in [0, 1) per class, so any prefix of the order is stratified
        idx = np.flatnonzero(y == c)
        key[idx] = (rng.permutation(len(idx)) + rng.random()) / len(idx)
    order = np.argsort(key, kind="stable")
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def _rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma |a_i - b_j|^2) (len(a), len(b)), through one matrix product."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-gamma * np.maximum(sq, 0.0))


def _fit_predict(z_fit: np.ndarray, y_fit: np.ndarray, z_out: np.ndarray, kernel: str, seed: int) -> np.ndarray:
    """The SVM's predictions on z_out after fitting (z_fit, y_fit); a single fit class is predicted everywhere.

    linear is `LinearSVC(C=1)`, rbf `SVC(kernel="rbf", C=1, gamma="scale")`, both computed in n <= d numbers
    per sample (n fit samples, d dimensions; the same SVMs): at 196,608 dimensions scikit-learn's own loops take
    minutes per attribute.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    from sklearn.svm import SVC, LinearSVC  # here: a second per process start, paid only by LS

    classes = np.unique(y_fit)
    if classes.size < 2:
        return np.full(len(z_out), classes[0])
    if kernel == "rbf":
        gamma = 1.0 / (z_fit.shape[1] * z_fit.var()) if z_fit.var() > 0 else 1.0  # scikit-learn's gamma="scale"
        svm = SVC(kernel="precomputed", C=1.0, random_state=seed).fit(_rbf_kernel(z_fit, z_fit, gamma), y_fit)
        return svm.predict(_rbf_kernel(z_out, z_fit, gamma))
    dual = len(z_fit) < z_fit.shape[1]  # what dual="auto" picks on the raw latents
    if dual:
        # w lies in the span of the fit samples (representer theorem): in an orthonormal basis of that span the
        # problem and the solver's iterates are the same, with n numbers per sample instead of d (50x faster on h)
        basis, _ = np.linalg.qr(z_fit.T)
        z_fit, z_out = z_fit @ basis, z_out @ basis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinearSVC convergence warnings on inseparable labels
        svm = LinearSVC(C=1.0, dual=dual, max_iter=10000, random_state=seed).fit(z_fit, y_fit)
    return svm.predict(z_out)


def _kept_splits(labels: np.ndarray | torch.Tensor, confidence: np.ndarray | torch.Tensor | None, keep: int | None,
                 heldout: float, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per attribute with at least two classes among its kept samples: (kept indices, their labels, fit part,
    held-out part), the parts as positions in the kept indices."""
    y = np.asarray(labels)
    y = y[:, None] if y.ndim == 1 else y
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout must lie in [0, 1), got {heldout}")
    conf = None if confidence is None else np.asarray(confidence, np.float64).reshape(y.shape)
    out = []
    for a in range(y.shape[1]):
        idx = np.arange(len(y))
        if keep is not None and keep < len(y):
            if conf is None:
                raise ValueError("keep needs confidence")
            idx = np.sort(np.argsort(-conf[:, a], kind="stable")[:keep])
        ya = y[idx, a]
        if np.unique(ya).size < 2:
            continue
        every = np.arange(len(idx))
        fit, held = (every, every) if heldout == 0.0 else heldout_split(ya, heldout, (seed, a))
        out.append((idx, ya, fit, held))
    return out


def linear_separability(
    latents: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    kernel: Literal["linear", "rbf"] = "linear",
    *,
    confidence: np.ndarray | torch.Tensor | None = None,
    keep: int | None = None,
    heldout: float = 0.5,
    seed: int = 0,
) -> float:
    """LS = exp(sum_i H(Y_i | X_i)), H in nats, X_i the SVM's prediction on held-out samples; in [1, ls_max].

    latents (N, d) (flattened if more dims); labels (N, A) integer classes, one column per attribute;
    confidence (N, A): with `keep`, only the `keep` most confident samples of each attribute are used.
    heldout: the fraction of those scored (`heldout_split`, seeded by (seed, attribute)); 0 fits and scores
    the same samples (StyleGAN's code; 1 whenever N <= d: for comparison only). An attribute with a single
    class among the kept samples contributes 0.
    """
    z = np.asarray(latents, np.float32).reshape(len(latents), -1)  # float64 only for one attribute's samples
    if len(np.asarray(labels)) != len(z):
        raise ValueError(f"latents ({len(z)}) and labels ({len(np.asarray(labels))}) differ in length")
    seed = int(seed) & 0xFFFFFFFF  # NumPy and scikit-learn take seeds in [0, 2**32)
    total = 0.0
    for idx, ya, fit, held in _kept_splits(labels, confidence, keep, heldout, seed):
        pred = _fit_predict(z[idx[fit]].astype(np.float64), ya[fit], z[idx[held]].astype(np.float64), kernel, seed)
        total += conditional_entropy(ya[held], pred)
    return float(np.exp(total))


def ls_max(
    labels: np.ndarray | torch.Tensor,
    *,
    confidence: np.ndarray | torch.Tensor | None = None,
    keep: int | None = None,
    heldout: float = 0.5,
    seed: int = 0,
) -> float:
    """exp(sum_i H(Y_i)) on the samples LS scores: the LS of a prediction that ignores the latents, and LS's upper
    bound. It falls when a model's attributes are less diverse, so LS / ls_max tells separability from diversity."""
    splits = _kept_splits(labels, confidence, keep, heldout, int(seed) & 0xFFFFFFFF)
    return float(np.exp(sum(conditional_entropy(ya[held], np.zeros(len(held))) for _, ya, _, held in splits)))


@torch.inference_mode()
def classify_samples(samples: SampleRange, classifier: Classifier, *, capture_h: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Classifier labels (n, A), confidences (n, A) and, with `capture_h`, the bottleneck h (n, m) float32 at
    the first DDIM step (h = e_t(x_T), t the first of `ddim_steps` timesteps) of the generated samples of
    `samples` (latents: stream 0 of `seed`, the same latents as the FID samples); h is None otherwise."""
    labs, confs, hs = [], [], []
    for lo, n in samples.batches():
        out = samples.sampler(initial_noise(n, samples.shape, samples.seed, start=lo), samples.ddim_steps, capture_h=capture_h)
        lab, conf = classifier(out.images)
        labs.append(lab.cpu().numpy())
        confs.append(conf.float().cpu().numpy())
        if capture_h:
            hs.append(out.h[0].flatten(1).float().numpy())
    if not labs:  # an empty shard
        empty = np.zeros((0, 0), np.float32)
        return empty.astype(np.int64), empty, (empty if capture_h else None)
    return np.concatenate(labs), np.concatenate(confs), (np.concatenate(hs) if capture_h else None)


def ls_name(space: str, kernel: str) -> str:
    """The results name of LS in `space` with `kernel`: ls, ls_rbf (x_T); ls_h, ls_h_rbf (h)."""
    if space not in LS_SPACES:
        raise ValueError(f"space must be one of {LS_SPACES}, got {space!r}")
    return "ls" + ("" if space == "x_T" else f"_{space}") + ("" if kernel == "linear" else f"_{kernel}")


def ls_scores(
    latents: Mapping[str, np.ndarray | torch.Tensor],
    labels: np.ndarray,
    confidence: np.ndarray,
    *,
    keep: int,
    kernels: tuple[str, ...] = ("linear", "rbf"),
    heldout: float = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """{ls_name(space, kernel): LS} for every space in `latents` ({"x_T": (N, ...), "h": (N, ...)}) and kernel,
    each on the `keep` most confident per attribute, scored on the held-out fraction `heldout`; and "ls_max"."""
    out = {ls_name(space, k): linear_separability(z, labels, k, confidence=confidence, keep=keep, heldout=heldout, seed=seed)
           for space, z in latents.items() for k in kernels}
    out["ls_max"] = ls_max(labels, confidence=confidence, keep=keep, heldout=heldout, seed=seed)
    return out
