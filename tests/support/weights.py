"""Stand-ins for the standard networks' weight files, in the published files' formats, built by the tests.

Nothing here is shipped or downloaded. `inception-2015-12-05.pt` is a TorchScript module that clean-fid's
`InceptionV3W` loads exactly as it loads NVIDIA's file: `.layers` maps (B, 3, 299, 299) in [-1, 1] to
(B, 2048, 1, 1), and the module itself takes [0, 255] images (`return_features=True`: the 2048 features). It is
a small random conv net (fixed seed) so that FID is cheap on a CPU and not trivially 0. `alexnet-owt-7be5be79.pth`
is torchvision's `alexnet()` state dict with a fixed seed, as torchvision's hub cache holds the real one.
Neither is the published file: FID computed with them is named `inception-v3-clean-unverified-<sha256 prefix>` (no
published Inception digest is on record) and PPL `lpips-alex-v0.1-unpublished-<sha256 prefix>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "inception-2015-12-05.pt"  # the names clean-fid and torchvision look for
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
SEED = 20261203


class _Layers(nn.Module):
    """(B, 3, 299, 299) in [-1, 1] -> (B, 2048, 1, 1): three strided convs, a 1x1 conv to 2048 channels,
    ReLU and a global average pool (non-negative features, as Inception's pool3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2)
        self.proj = nn.Conv2d(64, 2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.conv3(x))
        return F.adaptive_avg_pool2d(F.relu(self.proj(x)), 1)


class _StandInInception(nn.Module):
    """The interface of NVIDIA's TorchScript Inception: `layers`, and forward(x in [0, 255], return_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(x.shape[0], 2048)
        return features if return_features else self.output(features)


def build_inception(path: Path) -> Path:
    """Write the stand-in Inception TorchScript file to `path` (fixed seed: the same bytes' weights every time)."""
    torch.manual_seed(SEED)
    torch.jit.save(torch.jit.script(_StandInInception().eval()), str(path))
    return path


def build_alexnet(path: Path) -> Path:
    """Write torchvision's AlexNet state dict (random, fixed seed) to `path`, as torchvision's hub cache holds it."""
    from torchvision.models import alexnet

    torch.manual_seed(SEED)
    torch.save(alexnet().state_dict(), path)
    return path


@dataclass(frozen=True)
class StandardWeights:
    """dir: holds both files (pass as evaluation.weights_dir). torch_home: a TORCH_HOME whose hub/checkpoints
    holds the AlexNet file (it is `dir` itself, so the 244 MB file exists once)."""

    dir: Path
    inception: Path
    alexnet: Path
    torch_home: Path


def build_standard_weights(root: Path) -> StandardWeights:
    """Both stand-ins under root/torch/hub/checkpoints (about 2 s and 245 MB on disk)."""
    torch_home = root / "torch"
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    return StandardWeights(dir=checkpoints, inception=build_inception(checkpoints / INCEPTION_FILE),
                           alexnet=build_alexnet(checkpoints / ALEXNET_FILE), torch_home=torch_home)


@pytest.fixture(scope="session")
def standard_weights(tmp_path_factory) -> StandardWeights:
    """The stand-in Inception and AlexNet files, built once per test session (`--set evaluation.weights_dir=<.dir>`)."""
    return build_standard_weights(tmp_path_factory.mktemp("standard-weights"))
