"""LS's attribute classifier for image folders: a small CNN isosweep trains from `dataset.attributes`.

docs/math.md section 5 labels generated images with an attribute classifier. For `dataset.kind=shapes` that is
the domain network (`domain.py`); for an image folder (CelebA-HQ) it is the CNN here, trained by isosweep
on the folder's images and the per-image labels (`isosweep.data.attributes` reads them), then cached.

Classifier (`train_attribute_classifier`): `AttributeNet`, four conv stages and one logit per attribute,
trained from scratch with a binary cross-entropy per attribute (`ATTR_RECIPE`) on the labelled images at
min(recipe resolution, dataset.resolution) px. The images go through the dataset's own preprocessing
(resize, centre crop, no flip) at dataset.resolution and then the same antialiased resize that generated
images get, so training and evaluation images take the same path. Cached in
`<evaluation cache>/attributes/<name>/` (model.pt: state dict; info.json: names, resolution, held-out
accuracy, the cache key), where name = `attr-cnn-v1-<hash>` and the hash covers the dataset path and
preprocessing, the labels file's contents, the labelled images (names and sizes), the resolution and the
recipe: equal names mean the same classifier, so LS values are comparable only between equal names.
Written to a temporary directory and renamed into place, so concurrent trials never see half a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from isosweep.core.progress import progress_bar
from isosweep.data.attributes import AttributeFileError, match_images, read_attributes
from isosweep.data.datasets import ImageFolderDataset
from isosweep.data.images import to_uint8_tensor
from isosweep.evaluation.features.common import match_resolution
from isosweep.files import atomic_directory

__all__ = ["ATTR_CNN", "ATTR_RECIPE", "AttributeNet", "fit_attribute_net", "AttributeClassifier", "train_attribute_classifier"]

ATTR_CNN = "attr-cnn-v1"  # classifier names are f"{ATTR_CNN}-{hash}"
ATTR_RECIPE = dict(
    version=1,
    resolution=64,  # at most this many px (never above dataset.resolution)
    steps=2000,
    batch_size=64,
    lr=2e-3,
    weight_decay=1e-4,
    seed=0,
    noise=0.05,  # Gaussian pixel noise: robustness to a generator's imperfect images
    flip=False,  # horizontal flips (label-preserving for CelebA's 40 attributes, not for every labelling)
    heldout=0.1,  # fraction of labelled images held out to measure accuracy (none below 20 images)
    max_heldout=2000,
)
# --- the classifier -------------------------------------------------------------------------------


class AttributeNet(nn.Module):
    """(B, 3, R, R) in [-1, 1] -> (B, A) logits: conv stages of 32, 64, 128, 128 channels (the last three
    stride 2) with SiLU, 4x4 average pool, a 256-d layer and one logit per attribute. No normalisation layer:
    a GroupNorm would subtract the mean level of each image, and brightness and colour are attributes."""

    def __init__(self, num_attributes: int) -> None:
        super().__init__()
        self.num_attributes = int(num_attributes)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU())

        self.body = nn.Sequential(stage(3, 32, 1), stage(32, 64, 2), stage(64, 128, 2), stage(128, 128, 2), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(128 * 16, 256), nn.SiLU())
        self.head = nn.Linear(256, self.num_attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _load_images(dataset, indices: list[int], resolution: int, progress: bool) -> torch.Tensor:
    """The dataset's images `indices` (its own preprocessing), resized to `resolution` as generated images
    are, as uint8 (n, 3, r, r)."""
    workers = 0 if len(indices) < 2048 else min(8, os.cpu_count() or 1)
    loader = DataLoader(Subset(dataset, indices), batch_size=256, num_workers=workers, shuffle=False)
    out = []
    with progress_bar(total=len(loader), desc="loading labelled images", disable=not progress, leave=False) as bar:
        for imgs, _ in loader:
            out.append(to_uint8_tensor(match_resolution(imgs.float(), resolution)))
            bar.update(1)
    return torch.cat(out)


def fit_attribute_net(images: torch.Tensor, labels: np.ndarray | torch.Tensor, recipe: dict, *,
                      device: torch.device | str = "cpu", progress: bool = False) -> tuple[AttributeNet, dict]:
    """Train an `AttributeNet` on uint8 images (n, 3, r, r) and 0/1 labels (n, A) with `recipe`
    (`ATTR_RECIPE`'s keys). Returns (net on the CPU in eval mode, info: held-out accuracy and majority rate
    per attribute, counts, steps, seconds)."""
    r = recipe
    device = torch.device(device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    n, num_attr = y_all.shape
    g = torch.Generator().manual_seed(int(r["seed"]))
    perm = torch.randperm(n, generator=g)
    n_hold = 0 if n < 20 else min(int(r["max_heldout"]), int(round(r["heldout"] * n)))
    hold, train = perm[:n_hold], perm[n_hold:]
    torch.manual_seed(int(r["seed"]))
    net = AttributeNet(num_attr).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=int(r["steps"]))
    t0 = time.time()
    net.train()
    for _ in progress_bar(range(int(r["steps"])), desc=f"training {ATTR_CNN}", disable=not progress, leave=False):
        idx = train[torch.randint(0, len(train), (int(r["batch_size"]),), generator=g)]
        x = _to_float(images[idx])
        if r["noise"]:
            x = x + r["noise"] * torch.randn(x.shape, generator=g)
        if r["flip"]:
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.binary_cross_entropy_with_logits(net(x.to(device)), y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net = net.cpu().eval()
    info: dict = {"train_images": len(train), "heldout_images": n_hold, "steps": int(r["steps"]),
                  "final_loss": round(float(loss.detach()), 4), "train_s": round(time.time() - t0, 1)}
    if n_hold:
        with torch.no_grad():
            pred = torch.cat([(net(_to_float(images[hold[i:i + 256]])) > 0).float() for i in range(0, n_hold, 256)])
        yh = y_all[hold]
        info["heldout_accuracy"] = [round(float(v), 4) for v in (pred == yh).float().mean(0)]
        info["heldout_majority"] = [round(float(v), 4) for v in torch.maximum(yh.mean(0), 1 - yh.mean(0))]
    return net, info


@dataclass
class AttributeClassifier:
    """LS's attribute classifier for an image folder, with the interface of `DomainClassifier`:
    images (B, 3, H, W) in [-1, 1] -> (labels (B, A) long, 1 = has the attribute; confidence (B, A) =
    the probability of that label, in [0.5, 1]). Images are resized to `resolution` first."""

    net: AttributeNet
    resolution: int
    name: str
    attribute_names: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.net.parameters()).device
        p = torch.sigmoid(self.net(match_resolution(images.float(), self.resolution).to(dev)).float()).cpu()
        labels = (p > 0.5).long()
        return labels, torch.where(labels.bool(), p, 1 - p)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_attribute_classifier(dataset_spec, cache_root: str | os.PathLike, *, attributes: str | os.PathLike | None = None,
                               device: torch.device | str = "cpu", train_device: torch.device | str | None = None,
                               progress: bool = False, **overrides) -> AttributeClassifier:
    """The attribute classifier of an image folder (`dataset_spec`: kind image_folder, path, resolution,
    center_crop, attributes), loaded from `<cache_root>/attributes/<name>/` or trained and cached there.

    `attributes` overrides `dataset_spec.attributes`; `overrides` change `ATTR_RECIPE` entries (and so the
    name). Training runs on `train_device` (default: CUDA when available, else `device`). The returned
    classifier's `info` holds the recipe, held-out accuracy, the cache key and `trained_now` (False when
    it came from the cache). Raises `AttributeFileError` for an unusable labels file or no labelled image.
    """
    unknown = set(overrides) - set(ATTR_RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; use any of {sorted(ATTR_RECIPE)}")
    recipe = {**ATTR_RECIPE, **overrides}
    src = attributes if attributes is not None else getattr(dataset_spec, "attributes", None)
    if not src:
        raise AttributeFileError("LS on an image folder trains its attribute classifier from per-image labels, and "
                                 "dataset.attributes is not set; fix: set dataset.attributes to CelebA's list_attr_celeba.txt "
                                 "or a CSV `image,<attr_1>,...` (docs/metrics.md, LS), or drop ls from evaluation.metrics")
    table = read_attributes(src)
    dataset = ImageFolderDataset(dataset_spec.path, dataset_spec.resolution, dataset_spec.center_crop, random_flip=False)
    indices, labels, counts = match_images(table, dataset.root, dataset.files)
    if counts["labelled"] < counts["images"] / 2:
        warnings.warn(f"{table.path}: only {counts['labelled']} of the {counts['images']} images under {dataset.root} have labels; "
                      "the attribute classifier trains on those", stacklevel=2)
    resolution = min(int(recipe["resolution"]), int(dataset_spec.resolution))
    matched = hashlib.sha256()
    for i in indices:
        f = dataset.files[i]
        matched.update(f"{f.relative_to(dataset.root).as_posix()}\t{f.stat().st_size}\n".encode())
    key = {"classifier": ATTR_CNN, "dataset_path": str(dataset.root.resolve()), "dataset_resolution": int(dataset_spec.resolution),
           "center_crop": bool(dataset_spec.center_crop), "attributes_sha256": _file_sha256(table.path),
           "attributes_bytes": table.path.stat().st_size, "images_sha256": matched.hexdigest(), "resolution": resolution,
           "recipe": recipe}
    name = f"{ATTR_CNN}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    parent = Path(cache_root).expanduser() / "attributes"
    final = parent / name
    trained_now = False
    if not (final / "model.pt").is_file():
        images = _load_images(dataset, indices, resolution, progress)
        if train_device is None:
            train_device = "cuda" if torch.cuda.is_available() else device
        net, fit_info = fit_attribute_net(images, labels, recipe, device=train_device, progress=progress)
        info = {"name": name, "attribute_names": table.names, "resolution": resolution, "num_attributes": len(table.names),
                "positive_rate": [round(float(v), 4) for v in labels.mean(0)], **counts, **fit_info, "key": key,
                "labels_file": str(table.path), "format": table.format}
        with atomic_directory(final) as tmp:  # another trial may train the same classifier: first one wins
            torch.save(net.state_dict(), tmp / "model.pt")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
        trained_now = True
    info = json.loads((final / "info.json").read_text())
    net = AttributeNet(info["num_attributes"])
    net.load_state_dict(torch.load(final / "model.pt", map_location="cpu", weights_only=True))
    for p in net.parameters():
        p.requires_grad_(False)
    info["trained_now"] = trained_now
    info["cache_path"] = str(final)
    return AttributeClassifier(net.to(device).eval(), info["resolution"], name, tuple(info["attribute_names"]), info)
