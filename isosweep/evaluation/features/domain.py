"""The domain network (`domain-shapes-v1`): a small CNN isosweep trains on the built-in `shapes` data.

Its penultimate features give a Frechet distance, its channel-normalised multi-layer feature
differences an LPIPS-like distance (LPIPS without learned weights), and its heads are the attribute
classifier for LS. It needs no downloads, so it works on an air-gapped machine; values it produces
are named `domain-shapes-v1` and are never comparable with Inception/LPIPS values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from isosweep.core.progress import progress_bar
from isosweep.data.datasets import ShapesDataset
from isosweep.evaluation.features.common import DOMAIN_SHAPES, match_resolution
from isosweep.files import write_bytes_atomic

_DOMAIN_RECIPE = dict(version=1, steps=600, batch_size=64, lr=3e-3, train_size=4096, data_seed=20241, seed=0, noise=0.1)


class ShapesNet(nn.Module):
    """A small CNN over (B, 3, R, R) images in [-1, 1] predicting the shapes factors.

    layers: three conv stages (16, 32, 64 channels; the last two stride 2), then a 4x4 adaptive pool,
    a 256-d penultimate layer (FID features) and one linear head per factor.
    """

    def __init__(self, num_classes: tuple[int, ...]) -> None:
        super().__init__()
        self.num_classes = tuple(num_classes)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU()),
        ])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(256, k) for k in self.num_classes])

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stages' activations (for the perceptual distance)."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 256)."""
        return self.fc(self.pool(self.layers(x)[-1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]


def _domain_path(root: Path, resolution: int, recipe: dict) -> Path:
    blob = json.dumps({"resolution": resolution, **recipe}, sort_keys=True)
    return root / "domain" / f"{DOMAIN_SHAPES}-r{resolution}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.pt"


def train_shapes_net(resolution: int, *, progress: bool = False, **overrides) -> tuple[ShapesNet, dict]:
    """Train the domain network on a fixed shapes set (independent of any sweep's data seed, so every
    sweep at this resolution gets the same network). Returns (net, info with held-out accuracies)."""
    r = {**_DOMAIN_RECIPE, **overrides}
    data = ShapesDataset(r["train_size"] + 512, resolution, seed=r["data_seed"])
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    xtr, ytr, xte, yte = images[:-512], labels[:-512], images[-512:], labels[-512:]
    g = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    net = ShapesNet(ShapesDataset.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"])
    t0 = time.time()
    for _ in progress_bar(range(r["steps"]), desc=f"training {DOMAIN_SHAPES}", disable=not progress, leave=False):
        idx = torch.randint(0, len(xtr), (r["batch_size"],), generator=g)
        # noise makes it robust to the imperfect renderings a generator produces
        x = xtr[idx] + r["noise"] * torch.randn(xtr[idx].shape, generator=g)
        loss = sum(F.cross_entropy(logit, ytr[idx, k]) for k, logit in enumerate(net(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = [float((logit.argmax(1) == yte[:, k]).float().mean()) for k, logit in enumerate(net(xte))]
    info = {"recipe": r, "resolution": resolution, "heldout_accuracy": dict(zip(ShapesDataset.factor_names, acc)),
            "train_s": round(time.time() - t0, 1), "name": DOMAIN_SHAPES}
    return net, info


def load_shapes_net(resolution: int, root: str | os.PathLike, *, device: torch.device | str = "cpu",
                    progress: bool = False, **overrides) -> ShapesNet:
    """The cached domain network for this resolution and recipe, training (and caching) it on a miss."""
    recipe = {**_DOMAIN_RECIPE, **overrides}
    path = _domain_path(Path(root).expanduser(), resolution, recipe)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code runs
        net = ShapesNet(tuple(blob["num_classes"]))
        net.load_state_dict(blob["state_dict"])
    else:
        net, info = train_shapes_net(resolution, progress=progress, **overrides)
        buffer = io.BytesIO()
        torch.save({"state_dict": net.state_dict(), "num_classes": list(ShapesDataset.num_classes), "info": info}, buffer)
        write_bytes_atomic(path, buffer.getvalue())  # concurrent trials never read a half-written file
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval()


@dataclass
class DomainFeatures:
    """FID features of the domain network: images (B, 3, H, W) in [-1, 1] -> (B, 256)."""

    net: ShapesNet
    resolution: int
    name: str = DOMAIN_SHAPES

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        return self.net.features(match_resolution(images.float(), self.resolution).to(dev)).cpu()


@dataclass
class DomainDistance:
    """LPIPS-like distance from the domain network: sum over its three stages of the spatial mean of
    |f0 - f1|^2 summed over channels, with each feature vector normalised to unit length across
    channels (LPIPS with uniform instead of learned channel weights). (B, 3, H, W) x 2 -> (B,)."""

    net: ShapesNet
    resolution: int
    name: str = DOMAIN_SHAPES

    @torch.no_grad()  # not inference mode: PPL by forward-mode differentiation runs jvp through it
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        param = next(self.net.parameters())  # float32 in use; a float64 net measures in float64 (tests)
        fa = self.net.layers(match_resolution(a.to(param.dtype), self.resolution).to(param.device))
        fb = self.net.layers(match_resolution(b.to(param.dtype), self.resolution).to(param.device))
        total = torch.zeros(a.shape[0], device=param.device, dtype=param.dtype)
        for x, y in zip(fa, fb):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((x - y) ** 2).sum(dim=1).mean(dim=(1, 2))
        return total.cpu()


@dataclass
class DomainClassifier:
    """Attribute classifier for LS on shapes: images -> (labels (B, 5) long, confidence (B, 5) = max softmax)."""

    net: ShapesNet
    resolution: int
    name: str = DOMAIN_SHAPES

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.net.parameters()).device
        probs = [logit.softmax(1) for logit in self.net(match_resolution(images.float(), self.resolution).to(dev))]
        conf, lab = zip(*(p.max(dim=1) for p in probs))
        return torch.stack(lab, 1).cpu(), torch.stack(conf, 1).cpu()
