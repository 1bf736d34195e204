"""What every feature network shares: the names recorded with each metric, the cache folder, the error
raised when a network cannot be had here, and the resize generated images get before a network sees them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

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


def match_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, H, W) resized to resolution x resolution (antialiased bilinear) unless it already is."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return images
