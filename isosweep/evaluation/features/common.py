"""What every feature network shares: the names recorded with each metric, the published weight files and
how a file is checked against them, the cache folder, the error raised when a network cannot be had here,
and the resize generated images get before a network sees them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where images are resized: results and the sweep verbs import this module without it
    import torch

INCEPTION_FILE = "inception-2015-12-05.pt"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_NAME = "inception-v3-clean"
LPIPS_NAME = "lpips-alex-v0.1"
DOMAIN_SHAPES = "domain-shapes-v1"
NO_BACKBONE = "none"  # mRTL, MCN, VoR are computed in H and need no feature network
UNPUBLISHED = "unpublished"  # in a metric's backbone name: its weight file differs from the published one
UNVERIFIED = "unverified"  # in a metric's backbone name: no published digest is on record to check its file against


@dataclass(frozen=True)
class PublishedFile:
    """A published weight file of a standard network: what the name `base` in results promises.

    sha256: the full hex digest of the published file, or None where no public record of it was found (then
    no file can be shown to be the published one). size: bytes, where recorded. source: where the digest comes from.
    """

    filename: str
    base: str
    sha256: str | None
    size: int | None
    source: str


# The one record of the published files (role -> file). Checked 2026-12-03 against public sources only; no
# published file was available here to hash. Add a digest only from a public record that names it.
PUBLISHED: dict[str, PublishedFile] = {
    "inception": PublishedFile(
        INCEPTION_FILE, INCEPTION_NAME, None, None,
        "no public record of its sha256 was found (clean-fid, StyleGAN2-ADA/StyleGAN3, torch-fidelity and torchmetrics "
        "publish the URL only; torch-fidelity's and EDM's digests are of other files, pt_inception-...-6726825d.pth and "
        "inception-2015-12-05.pkl); clean-fid's file name carries no hash, so no Inception file can be verified"),
    "alexnet": PublishedFile(
        ALEXNET_FILE, LPIPS_NAME, "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244_408_911,
        "torchvision names the file with the first 8 hex digits of its sha256 (7be5be79, what torch.hub's check_hash "
        "verifies on download); the full digest and size as pinned by several independent public projects that verify "
        "the download from download.pytorch.org, all agreeing and all starting with that prefix"),
}


@dataclass(frozen=True)
class WeightsCheck:
    """One weight file checked against PUBLISHED: its digest, whether it is the published file, and the name
    its metric records: the base name; the base name with `-unpublished-<first 12 hex of its sha256>` when the file
    differs from the published one; `-unverified-<...>` when no published digest is on record (then the published
    file and any other are told apart by the digest alone, which the name carries)."""

    role: str
    path: Path
    sha256: str
    published: bool
    name: str

    def describe(self) -> str:
        """One line for people: path, digest and what it means."""
        ref = PUBLISHED[self.role]
        if self.published:
            verdict = "the published file"
        elif ref.sha256 is None:
            verdict = (f"cannot be verified ({ref.filename} has no published sha256 on record): recorded as unverified; "
                       "compare the sha256 with a copy you downloaded from the URL yourself")
        else:
            verdict = f"NOT the published file (that has sha256 {ref.sha256})"
        return f"{self.path} sha256 {self.sha256}: {verdict}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, computed once per process for each (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def check_weights(role: str, path: str | os.PathLike) -> WeightsCheck:
    """Check the weight file of `role` ("inception" or "alexnet") against its published digest."""
    ref = PUBLISHED[role]
    digest = file_sha256(path)
    published = ref.sha256 is not None and digest == ref.sha256
    label = UNVERIFIED if ref.sha256 is None else UNPUBLISHED
    name = ref.base if published else f"{ref.base}-{label}-{digest[:12]}"
    return WeightsCheck(role=role, path=Path(path), sha256=digest, published=published, name=name)


def unpublished_note(backbones: dict[str, str]) -> str | None:
    """The one sentence results print when a metric used a weight file not known to be the published one; else None."""
    bad = sorted(f"{metric} [{name}]" for metric, name in backbones.items() if UNPUBLISHED in name or UNVERIFIED in name)
    if not bad:
        return None
    return (f"Not comparable with published FID/PPL: {', '.join(bad)} used weight files that are not known to be the "
            "published ones (the name ends with the file's sha256; docs/metrics.md, \"Checking the weight files\").")


class BackboneUnavailable(RuntimeError):
    """The requested feature network cannot be loaded here; the message says which files go where."""


def cache_dir(eval_spec=None) -> Path:
    """evaluation.cache_dir, else $ISOSWEEP_CACHE/eval, else ~/.cache/isosweep/eval."""
    if eval_spec is not None and getattr(eval_spec, "cache_dir", None):
        return Path(os.path.expanduser(eval_spec.cache_dir))
    if os.environ.get("ISOSWEEP_CACHE"):
        return Path(os.path.expanduser(os.environ["ISOSWEEP_CACHE"])) / "eval"
    return Path.home() / ".cache" / "isosweep" / "eval"


def private_weights_dir(eval_spec=None) -> Path:
    """`cache_dir(eval_spec)/weights`: the folder, private to its user (0700), where the Inception file may be put
    instead of `evaluation.weights_dir` (`standard.find_standard_weights` checks who may write it)."""
    return cache_dir(eval_spec) / "weights"


def match_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, H, W) resized to resolution x resolution (antialiased bilinear) unless it already is."""
    import torch.nn.functional as F

    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return images
