"""The standard feature networks: clean-fid's Inception-v3 for FID and LPIPS v0.1 with AlexNet for PPL.

Nothing here downloads: the weight files are looked up in `evaluation.weights_dir`, then in isosweep's private
weights folder (`common.private_weights_dir`, Inception only) and torchvision's `$TORCH_HOME/hub/checkpoints`
(AlexNet only). Never in `/tmp`, where clean-fid downloads Inception: that TorchScript file is code FID runs, and
any user of the machine can put a file there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import torch

from isosweep.data.images import to_uint8_tensor
from isosweep.evaluation.features.common import ALEXNET_FILE, INCEPTION_FILE, check_weights, private_weights_dir
from isosweep.storage import make_private_dirs

CLEANFID_DIR = Path("/tmp")  # where clean-fid downloads Inception: never looked in, only named when a file there is ignored
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def _torch_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _private_folder(private_dir: str | os.PathLike | None) -> Path:
    """The private weights folder (default `common.private_weights_dir()`), created 0700 when missing."""
    folder = Path(private_dir) if private_dir is not None else private_weights_dir()
    try:
        make_private_dirs(folder)
    except OSError:  # a read-only cache: nothing can be found there, and the message still names it
        pass
    return folder


def untrusted_reason(path: Path) -> str | None:
    """Why a weight file in the private folder is not loaded, or None when it may be: the file and the folder it
    really lies in must belong to this user and be writable by nobody else (a TorchScript file is code)."""
    me, folder = os.getuid(), Path(os.path.realpath(path)).parent
    for what, target in (("it", path), (f"its folder {folder}", folder)):
        try:
            st = target.stat()
        except OSError as exc:
            return f"{what} cannot be checked ({exc})"
        if st.st_uid != me:
            return f"{what} belongs to uid {st.st_uid}, not to this user (uid {me})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _candidates(weights_dir: str | None, filename: str, default_dir: Path) -> list[Path]:
    out = []
    if weights_dir:
        out.append(Path(os.path.expanduser(weights_dir)) / filename)
    out.append(default_dir / filename)
    return out


def _usable(path: Path, private: bool) -> bool:
    return path.is_file() and not (private and untrusted_reason(path))


def find_standard_weights(weights_dir: str | None = None, private_dir: str | os.PathLike | None = None) -> dict[str, Path | None]:
    """{'inception': path or None, 'alexnet': path or None}: the first usable candidate of each (weights_dir, then
    the private weights folder for Inception, where a file counts only if `untrusted_reason` finds nothing, or
    $TORCH_HOME/hub/checkpoints for AlexNet)."""
    private = _private_folder(private_dir)
    found: dict[str, Path | None] = {}
    for key, filename, default in (("inception", INCEPTION_FILE, private), ("alexnet", ALEXNET_FILE, _torch_checkpoints())):
        found[key] = next((p for p in _candidates(weights_dir, filename, default)
                           if _usable(p, key == "inception" and p.parent == default)), None)
    return found


def missing_weights_message(weights_dir: str | None, found: dict[str, Path | None],
                            private_dir: str | os.PathLike | None = None) -> str:
    """What is missing, every place looked in, why a file there was refused, and where to put the files."""
    private = _private_folder(private_dir)
    lines = ["the standard backbones (Inception for FID, LPIPS-AlexNet for PPL) need weight files that are not here:"]
    where = {"inception": (INCEPTION_FILE, private, INCEPTION_URL), "alexnet": (ALEXNET_FILE, _torch_checkpoints(), ALEXNET_URL)}
    for key, (filename, default, url) in where.items():
        if found.get(key) is not None:
            continue
        places = _candidates(weights_dir, filename, default)
        lines.append(f"  - {filename} (from {url}); looked in: {', '.join(map(str, places))}")
        if key != "inception":
            continue
        if places[-1].is_file() and (why := untrusted_reason(places[-1])):
            lines.append(f"    {places[-1]} is not loaded: {why}; a TorchScript file is code that FID runs. "
                         f"fix: put your own copy there, with `chmod 700 {private}` and `chmod 600` on the file, or use evaluation.weights_dir")
        ignored = CLEANFID_DIR / filename
        if ignored not in places and ignored.is_file():
            lines.append(f"    {ignored} (clean-fid's download place) is not loaded: every user of this machine can write "
                         f"{CLEANFID_DIR}, and a TorchScript file is code that FID runs. fix: move it to {private}/ "
                         "(private to you) or to evaluation.weights_dir")
    lines.append("fix: download them on a connected machine and copy both into one directory, then set "
                 "evaluation.weights_dir=/that/dir (or use evaluation.backbone=domain for the built-in shapes problem)")
    return "\n".join(lines)


class InceptionFeatures:
    """clean-fid's Inception-v3 pool features: images (B, 3, H, W) in [-1, 1] -> (B, 2048) float32.

    Preprocessing ("clean" mode): quantise to uint8 values, then clean-fid's PIL bicubic float resize to
    299x299, per image, exactly as `cleanfid.fid.get_model_features` does. `name`: what FID records, which says
    whether the file is the published one (`common.check_weights`).
    """

    def __init__(self, weights_path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        path = Path(weights_path)
        self.name = check_weights("inception", path).name
        self.device = torch.device(device)
        from cleanfid.inception_torchscript import InceptionV3W  # here, not at the top: with torchvision, 2-3 s per
        from cleanfid.resize import build_resizer  # process start, paid only by runs that use the standard networks

        self.model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
        self.resize = build_resizer("clean")

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_tensor(images).float().cpu().numpy().transpose(0, 2, 3, 1)  # (B, H, W, C) on the uint8 grid, as a saved PNG read back
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        batch = torch.from_numpy(np.stack([self.resize(im).transpose(2, 0, 1) for im in x])).float()
        return self.model(batch.to(self.device)).float().cpu()


class LpipsDistance:
    """LPIPS v0.1 with AlexNet: two image batches (B, 3, H, W) in [-1, 1] -> (B,) distances.

    The AlexNet weights come from `alexnet_path` (never downloaded); the linear layers from the lpips
    package. Images are used at their own resolution. `name`: what PPL records, which says whether the AlexNet
    file is the published one (`common.check_weights`).
    """

    def __init__(self, alexnet_path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        self.name = check_weights("alexnet", alexnet_path).name
        self.device = torch.device(device)
        import lpips  # here, not at the top (torchvision): paid only by runs that use it

        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(alexnet_path, map_location="cpu", weights_only=True)
        net = model.net  # slices hold torchvision's alexnet.features modules under their original indices
        for pname, param in net.named_parameters():
            _slice, idx, leaf = pname.split(".")
            param.data.copy_(state[f"features.{idx}.{leaf}"])
        self.model = model.to(self.device).eval()

    @torch.no_grad()  # not inference mode: PPL by forward-mode differentiation runs jvp through it
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a.to(self.device).float(), b.to(self.device).float()).reshape(-1).cpu()
