"""Feature networks behind FID, PPL and LS, and which one a run uses.

Two families, never compared with each other (every metric records the name of the network behind it):

- **standard**: clean-fid's Inception-v3 (`inception-2015-12-05.pt`, mode "clean": PIL bicubic resize of
  the float image to 299x299) for FID, and LPIPS v0.1 with AlexNet (`alexnet-owt-7be5be79.pth` plus the
  linear layers that ship inside the `lpips` package) for PPL. Names: `inception-v3-clean`, `lpips-alex-v0.1`.
- **domain** (`domain-shapes-v1`): a small CNN that isosweep trains on the built-in `shapes` dataset to
  predict its five factors. Its penultimate features give a Frechet distance, its channel-normalised
  multi-layer feature differences an LPIPS-like distance (LPIPS without learned weights), and its heads
  are the attribute classifier for LS. It needs no downloads, so it works on an air-gapped machine.

`resolve_backbone(eval_spec, dataset_spec)` implements evaluation.backbone = auto | standard | domain.
Nothing here downloads: weights are looked up in `evaluation.weights_dir`, then where clean-fid
(`/tmp`) and torchvision (`$TORCH_HOME/hub/checkpoints`) keep them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INCEPTION_FILE",
    "ALEXNET_FILE",
    "DOMAIN_SHAPES",
    "BackboneUnavailable",
    "FeatureNetworks",
    "cache_dir",
    "find_standard_weights",
    "resolve_backbone",
    "metric_backbone_names",
    "InceptionFeatures",
    "LpipsDistance",
    "ShapesNet",
    "train_shapes_net",
    "load_shapes_net",
    "DomainFeatures",
    "DomainDistance",
    "DomainClassifier",
    "load_feature_networks",
]

INCEPTION_FILE = "inception-2015-12-05.pt"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_NAME = "inception-v3-clean"
LPIPS_NAME = "lpips-alex-v0.1"
DOMAIN_SHAPES = "domain-shapes-v1"
NO_BACKBONE = "none"  # mRTL, MCN, VoR are computed in H and need no feature network


class BackboneUnavailable(RuntimeError):
    """The requested feature network cannot be loaded here; the message says which files go where."""


def cache_dir(eval_spec=None) -> Path:
    """evaluation.cache_dir, else $ISOSWEEP_CACHE/eval, else ~/.cache/isosweep/eval."""
    if eval_spec is not None and getattr(eval_spec, "cache_dir", None):
        return Path(os.path.expanduser(eval_spec.cache_dir))
    if os.environ.get("ISOSWEEP_CACHE"):
        return Path(os.path.expanduser(os.environ["ISOSWEEP_CACHE"])) / "eval"
    return Path.home() / ".cache" / "isosweep" / "eval"


def _torch_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _candidates(weights_dir: str | None, filename: str, default_dir: Path) -> list[Path]:
    out = []
    if weights_dir:
        out.append(Path(os.path.expanduser(weights_dir)) / filename)
    out.append(default_dir / filename)
    return out


def find_standard_weights(weights_dir: str | None = None) -> dict[str, Path | None]:
    """{'inception': path or None, 'alexnet': path or None}: the first existing candidate of each
    (weights_dir, then /tmp for Inception as clean-fid uses, $TORCH_HOME/hub/checkpoints for AlexNet)."""
    found: dict[str, Path | None] = {}
    for key, filename, default in (("inception", INCEPTION_FILE, Path("/tmp")), ("alexnet", ALEXNET_FILE, _torch_checkpoints())):
        found[key] = next((p for p in _candidates(weights_dir, filename, default) if p.is_file()), None)
    return found


def _missing_message(weights_dir: str | None, found: dict[str, Path | None]) -> str:
    lines = ["the standard backbones (Inception for FID, LPIPS-AlexNet for PPL) need weight files that are not here:"]
    where = {"inception": (INCEPTION_FILE, Path("/tmp"), "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
             "alexnet": (ALEXNET_FILE, _torch_checkpoints(), "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")}
    for key, (filename, default, url) in where.items():
        if found.get(key) is None:
            places = [str(p) for p in _candidates(weights_dir, filename, default)]
            lines.append(f"  - {filename} (from {url}); looked in: {', '.join(places)}")
    lines.append("fix: download them on a connected machine and copy both into one directory, then set "
                 "evaluation.weights_dir=/that/dir (or use evaluation.backbone=domain for the built-in shapes problem)")
    return "\n".join(lines)


def resolve_backbone(eval_spec, dataset_spec) -> str:
    """The feature-network family a run uses: "standard" or "domain-shapes-v1".

    auto: standard when both weight files are present, else the domain network when the dataset is
    `shapes`, else an error naming the files. standard: an error when weights are missing. domain: only
    for `shapes`.
    """
    choice = eval_spec.backbone
    found = find_standard_weights(eval_spec.weights_dir)
    have_standard = all(v is not None for v in found.values())
    if choice == "standard" or (choice == "auto" and dataset_spec.kind != "shapes"):
        if not have_standard:
            raise BackboneUnavailable(_missing_message(eval_spec.weights_dir, found))
        return "standard"
    if choice == "domain":
        if dataset_spec.kind != "shapes":
            raise BackboneUnavailable(
                f"evaluation.backbone=domain exists only for dataset.kind=shapes (got {dataset_spec.kind!r}); "
                "fix: use evaluation.backbone=standard with the Inception/AlexNet weights in evaluation.weights_dir"
            )
        return DOMAIN_SHAPES
    return "standard" if have_standard else DOMAIN_SHAPES


def metric_backbone_names(family: str, dataset_kind: str) -> dict[str, str]:
    """The network behind each metric, as recorded in results: {'fid', 'ppl', 'ls', 'mrtl', 'mcn', 'vor'}."""
    if family == "standard":
        names = {"fid": INCEPTION_NAME, "ppl": LPIPS_NAME}
    elif family == DOMAIN_SHAPES:
        names = {"fid": DOMAIN_SHAPES, "ppl": DOMAIN_SHAPES}
    else:
        raise ValueError(f"unknown backbone family {family!r}")
    names["ls"] = DOMAIN_SHAPES if dataset_kind == "shapes" else "unavailable"
    names.update(mrtl=NO_BACKBONE, mcn=NO_BACKBONE, vor=NO_BACKBONE)
    return names


# --- standard -------------------------------------------------------------------------------------


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 255] floats on the uint8 grid (what saving a PNG and reading it back gives)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


class InceptionFeatures:
    """clean-fid's Inception-v3 pool features: images (B, 3, H, W) in [-1, 1] -> (B, 2048) float32.

    Preprocessing ("clean" mode): quantise to uint8 values, then clean-fid's PIL bicubic float resize to
    299x299, per image, exactly as `cleanfid.fid.get_model_features` does.
    """

    name = INCEPTION_NAME

    def __init__(self, weights_path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = Path(weights_path)
        self.device = torch.device(device)
        self.model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
        self.resize = build_resizer("clean")

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _quantize(images).cpu().numpy().transpose(0, 2, 3, 1)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        batch = torch.from_numpy(np.stack([self.resize(im).transpose(2, 0, 1) for im in x])).float()
        return self.model(batch.to(self.device)).float().cpu()


class LpipsDistance:
    """LPIPS v0.1 with AlexNet: two image batches (B, 3, H, W) in [-1, 1] -> (B,) distances.

    The AlexNet weights come from `alexnet_path` (never downloaded); the linear layers from the lpips
    package. Images are used at their own resolution.
    """

    name = LPIPS_NAME

    def __init__(self, alexnet_path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        import lpips

        self.device = torch.device(device)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(alexnet_path, map_location="cpu", weights_only=True)
        net = model.net  # slices hold torchvision's alexnet.features modules under their original indices
        for pname, param in net.named_parameters():
            _slice, idx, leaf = pname.split(".")
            param.data.copy_(state[f"features.{idx}.{leaf}"])
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a.to(self.device).float(), b.to(self.device).float()).reshape(-1).cpu()


# --- domain network for shapes --------------------------------------------------------------------

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
    from isosweep.data import ShapesDataset

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
    from tqdm.auto import tqdm

    for _ in tqdm(range(r["steps"]), desc=f"training {DOMAIN_SHAPES}", disable=not progress, leave=False):
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
    from isosweep.data import ShapesDataset

    recipe = {**_DOMAIN_RECIPE, **overrides}
    path = _domain_path(Path(root).expanduser(), resolution, recipe)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        net = ShapesNet(tuple(blob["num_classes"]))
        net.load_state_dict(blob["state_dict"])
    else:
        net, info = train_shapes_net(resolution, progress=progress, **overrides)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": net.state_dict(), "num_classes": list(ShapesDataset.num_classes), "info": info}, tmp)
        os.replace(tmp, path)  # atomic: concurrent trials never read a half-written file
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval()


def _match_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return images


@dataclass
class DomainFeatures:
    """FID features of the domain network: images (B, 3, H, W) in [-1, 1] -> (B, 256)."""

    net: ShapesNet
    resolution: int
    name: str = DOMAIN_SHAPES

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        return self.net.features(_match_resolution(images.float(), self.resolution).to(dev)).cpu()


@dataclass
class DomainDistance:
    """LPIPS-like distance from the domain network: sum over its three stages of the spatial mean of
    |f0 - f1|^2 summed over channels, with each feature vector normalised to unit length across
    channels (LPIPS with uniform instead of learned channel weights). (B, 3, H, W) x 2 -> (B,)."""

    net: ShapesNet
    resolution: int
    name: str = DOMAIN_SHAPES

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        fa = self.net.layers(_match_resolution(a.float(), self.resolution).to(dev))
        fb = self.net.layers(_match_resolution(b.float(), self.resolution).to(dev))
        total = torch.zeros(a.shape[0], device=dev)
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
        probs = [logit.softmax(1) for logit in self.net(_match_resolution(images.float(), self.resolution).to(dev))]
        conf, lab = zip(*(p.max(dim=1) for p in probs))
        return torch.stack(lab, 1).cpu(), torch.stack(conf, 1).cpu()


@dataclass
class FeatureNetworks:
    """The networks one evaluation uses, with the name recorded for each metric."""

    family: str
    names: dict[str, str] = field(default_factory=dict)
    fid_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    classifier: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def load_feature_networks(eval_spec, dataset_spec, *, needs: tuple[str, ...] = ("fid", "ppl", "ls"),
                          device: torch.device | str = "cpu", progress: bool = False) -> FeatureNetworks:
    """Load what the metrics in `needs` use (resolving evaluation.backbone); raises BackboneUnavailable.

    LS on an image folder uses the attribute classifier trained from dataset.attributes
    (`isosweep.attributes.train_attribute_classifier`, cached); its name is nets.names["ls"]. When no FID or
    PPL network is needed there, evaluation.backbone is not resolved (LS alone needs no Inception/AlexNet).
    """
    folder_ls_only = dataset_spec.kind != "shapes" and not any(m in needs for m in ("fid", "ppl"))
    family = "standard" if folder_ls_only else resolve_backbone(eval_spec, dataset_spec)
    nets = FeatureNetworks(family=family, names=metric_backbone_names(family, dataset_spec.kind))
    res = dataset_spec.resolution
    root = cache_dir(eval_spec)
    domain = None
    if family == DOMAIN_SHAPES or ("ls" in needs and dataset_spec.kind == "shapes"):
        domain = load_shapes_net(res, root, device=device, progress=progress)
    if "ls" in needs:
        if domain is not None:
            nets.classifier = DomainClassifier(domain, res)
        else:  # image folder: a classifier trained on dataset.attributes (AttributeFileError is a BackboneUnavailable)
            from isosweep.attributes import train_attribute_classifier

            nets.classifier = train_attribute_classifier(dataset_spec, root, device=device, progress=progress)
            nets.names["ls"] = nets.classifier.name
    if family == "standard":
        found = find_standard_weights(eval_spec.weights_dir)
        if "fid" in needs:
            nets.fid_features = InceptionFeatures(found["inception"], device)
        if "ppl" in needs:
            nets.distance = LpipsDistance(found["alexnet"], device)
    else:
        nets.fid_features = DomainFeatures(domain, res)
        nets.distance = DomainDistance(domain, res)
    return nets
