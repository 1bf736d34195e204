"""A trial's checkpoint folder: writing it atomically, checking it against its manifest, choosing one to resume from.

    model_index.json, unet/, scheduler/   the EMA UNet + scheduler: `DDPMPipeline.from_pretrained(dir)` (in the
                                          final checkpoint of a run with a cheap FID: the selected step's); a
                                          latent model's in `LDMPipeline`'s layout, its frozen autoencoder
                                          (`vqvae/`) saved as loaded and a DDIM scheduler, as the base had
    train_state.pt                        raw weights, optimizer, EMA, GradScaler, step, epoch, data
                                          position, RNG states: what resume needs
    spec.json                             the resolved spec and the trial parameters
    selection.json, best/                 (with evaluation.checkpoint_fid) the cheap-FID curve and the best EMA
                                          weights so far, as safetensors (`selection.py`)
    eval/                                 (final checkpoint, when evaluated) the evaluation record
    manifest.json                         written last: every other file's path, size and sha256

Nothing read back is unpickled: `train_state.pt` holds tensors and plain Python values only (the RNG
states too) and is read with `torch.load(weights_only=True)`, so a checkpoint from storage can never
run code when loaded. A checkpoint is used only when every file its manifest lists is there with the
listed size and sha256; resume takes the newest checkpoint of the run that passes (`resume_state`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from isosweep import storage
from isosweep.core.ema import EMA
from isosweep.files import MANIFEST, atomic_directory, scratch_dir
from isosweep.training.best_step import read_saved

if TYPE_CHECKING:  # types only: reading a manifest (the trial process, registration) needs no diffusers
    from diffusers import UNet2DModel

    from isosweep.core.codec import Codec

TRAIN_STATE = "train_state.pt"
MANIFEST_FORMAT = "isosweep-checkpoint/1"
SIBLING_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders (checkpoint_<time>), LocalReporter's (checkpoint_<step>)
_HASH_CHUNK = 1 << 22  # bytes read at a time while hashing


class CheckpointError(ValueError):
    """A checkpoint that is not used: corrupt, unsafe to load, or none of a run's checkpoints verifies."""

    deterministic = True  # the stored files stay as they are: not retried (isosweep.errors)


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none); `problem` says what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"checkpoint {path} is corrupt: {problem}")
        self.path, self.problem = path, problem


class UnsafeCheckpointError(CheckpointError):
    """A train_state.pt that holds objects other than tensors and plain values (loading it could run code)."""


class StoredCheckpoint(Protocol):
    """A checkpoint in storage: a `pyarrow.fs` file system and a path in it (`ray.train.Checkpoint` is one)."""

    filesystem: pafs.FileSystem
    path: str


@dataclass
class Location:
    filesystem: pafs.FileSystem
    path: str


def save_checkpoint(directory: Path, unet: UNet2DModel, ema: EMA, scheduler, state: dict[str, Any],
                    spec_json: dict[str, Any], *, extra: Callable[[Path], None] | None = None,
                    model: UNet2DModel | None = None, codec: Codec | None = None, max_steps: int | None = None) -> Path:
    """Write the checkpoint folder `directory` (which must not exist) atomically.

    Everything is written into a temporary folder beside it: the EMA UNet (or `model`, the selected weights
    of a final checkpoint) + scheduler as a DDPMPipeline directory, train_state.pt, spec.json, then
    `extra(folder)` (the selection and the evaluation record), then manifest.json
    last; one rename then puts the folder in place. A reader never sees a half-written checkpoint, and a
    copy cut off while uploading lacks files or its manifest, which `verify_checkpoint` reports.
    """
    with atomic_directory(directory) as tmp:
        ema_unet = (copy.deepcopy(model) if model is not None else ema.copy_to(copy.deepcopy(unet))).to("cpu").eval()
        from diffusers import DDIMScheduler, DDPMPipeline, LDMPipeline  # the writer only

        if codec is None or codec.module is None:  # a pixel model (or the identity autoencoder)
            DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(tmp)
        else:  # a latent model keeps its layout, so the checkpoint loads back as the base did
            LDMPipeline(vqvae=copy.deepcopy(codec.module).to("cpu"), unet=ema_unet,
                        scheduler=DDIMScheduler.from_config(scheduler.config)).save_pretrained(tmp)
        torch.save(state, tmp / TRAIN_STATE)
        (tmp / "spec.json").write_text(json.dumps(spec_json, indent=2, sort_keys=True))
        if extra is not None:
            extra(tmp)
        write_manifest(tmp, step=int(state["step"]), max_steps=max_steps)
    return directory


def write_manifest(directory: str | Path, step: int | None = None, max_steps: int | None = None) -> Path:
    """Record every file under `directory` (its path relative to it, size in bytes, sha256) in manifest.json, with the
    step it was saved at and the run's total steps (`max_steps`, when given: how `isosweep status` tells progress)."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    out = directory / MANIFEST
    head = {"format": MANIFEST_FORMAT, "step": step, **({"max_steps": int(max_steps)} if max_steps is not None else {})}
    out.write_text(json.dumps({**head, "files": files}, indent=1, sort_keys=True))
    return out


def verify_checkpoint(directory: str | Path, name: str | None = None) -> dict[str, Any]:
    """The manifest of the local checkpoint folder `directory`; CorruptCheckpointError (naming `name`, default
    the folder, and every problem) when the manifest is missing or unreadable, or a listed file is missing or
    has another size or sha256. Files the manifest does not list are ignored (never read by resume)."""
    directory = Path(directory)
    name = name or str(directory)
    manifest = read_manifest(name, (directory / MANIFEST).read_bytes() if (directory / MANIFEST).is_file() else None)
    problems = []
    for rel, entry in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"the sha256 of {rel} differs from the manifest's (the file changed after it was written)")
    if problems:
        raise CorruptCheckpointError(name, "; ".join(problems))
    return manifest


def load_train_state(checkpoint_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The training state of a local checkpoint folder, after checking it against its manifest (`verify`),
    loaded with `torch.load(weights_only=True)`: no code in the file can run."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint (no {TRAIN_STATE}); resume needs a checkpoint written by isosweep train")
    if verify:
        verify_checkpoint(checkpoint_dir)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors and plain values, so it is not loaded (loading could run "
            f"code): {(lines or str(exc).splitlines())[0].strip()}; fix: resume from a checkpoint written by "
            "isosweep train, and find out who wrote this file") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CorruptCheckpointError(str(path.parent), f"{TRAIN_STATE} cannot be read: {str(exc).splitlines()[0]}") from None


@dataclass
class ResumePoint:
    """The state resume continues from, the checkpoint it came from, and the newer ones passed over."""

    state: dict[str, Any]
    source: str
    skipped: list[str] = field(default_factory=list)  # one "checkpoint X is corrupt: ..." line per newer checkpoint


def resume_state(location: str | os.PathLike | StoredCheckpoint, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> ResumePoint:
    """The train state of the newest good checkpoint at or before `location`; every DDP rank calls it.

    `location`: a local folder, a storage URI, or a checkpoint in a `pyarrow.fs` file system (a Ray
    `Checkpoint`). It is used when it verifies; otherwise, when its folder is named `checkpoint_*`, its
    older siblings in the same run folder are tried, newest first (Ray Train keeps several). Rank 0 chooses
    and the other ranks read the same one, so every rank resumes from one step. Copies of remote
    checkpoints go to temporary folders that are removed on every exit path. CheckpointError when none
    verifies (naming each one and what is wrong) or when a train_state.pt holds code.
    """
    loc = as_location(location)
    if world_size == 1:
        return _newest_good(loc)
    chosen, error = [None], None
    if rank == 0:
        try:
            point = _newest_good(loc)
            chosen = [("ok", point.source, point.skipped)]
        except Exception as exc:  # noqa: BLE001 (any error: broadcast it first, or the other ranks would wait forever)
            error, chosen = exc, [("error", f"{type(exc).__name__}: {exc}", [])]
    dist.broadcast_object_list(chosen, src=0)
    kind, text, skipped = chosen[0]
    if kind == "error":
        raise error if rank == 0 else CheckpointError(f"rank 0 could not resume: {text}")
    if rank != 0:
        try:
            point = ResumePoint(_load(_candidates(loc, only=text)[0]), text, skipped)
        except Exception as exc:  # noqa: BLE001 (raised below, after every rank has said whether it succeeded)
            error = exc
    ok = torch.tensor([0.0 if error else 1.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if ok.item() == 0:
        raise CheckpointError(f"another rank could not read {text}, which rank 0 verified; see that rank's error")
    return point


def as_location(location: str | os.PathLike | StoredCheckpoint) -> Location:
    """(file system, path) of a local folder, a storage URI (`s3://...?endpoint_override=`) or a stored checkpoint."""
    if hasattr(location, "filesystem") and hasattr(location, "path"):
        return Location(location.filesystem, str(location.path))
    fs, path = storage.filesystem(str(location))
    return Location(fs, path)


def _newest_good(loc: Location) -> ResumePoint:
    """Try `loc`, then its older siblings, newest first; the first that verifies and loads wins."""
    skipped = []
    candidates = _candidates(loc)
    for candidate in candidates:
        try:
            return ResumePoint(_load(candidate), _display(candidate), skipped)
        except CorruptCheckpointError as exc:
            skipped.append(str(exc))
    raise CheckpointError(
        f"no checkpoint to resume from verifies against its manifest: {'; '.join(skipped)}. Fix: resume from an "
        "older copy of the run (--resume-from DIR), or start the run again without it; a checkpoint that lacks "
        f"{MANIFEST} but is known good can be accepted with "
        "`python -c 'from isosweep.training.checkpoint import write_manifest; write_manifest(\"DIR\")'`")


def _candidates(loc: Location, only: str | None = None) -> list[Location]:
    """`loc`, then the `checkpoint_*` folders beside it whose names sort before its own (older), newest first.

    Ray Train names checkpoints by time (checkpoint_2026-11-25_10-30-00.123456), LocalReporter by
    zero-padded step, so the name order is the age order. A folder not named `checkpoint_*` (a copy
    given to --resume-from) has no siblings. `only`: just the candidate displayed as that."""
    path = PurePosixPath(loc.path)
    found = [loc]
    if path.name.startswith(SIBLING_PREFIX):
        selector = pafs.FileSelector(str(path.parent), allow_not_found=True, recursive=False)
        siblings = [PurePosixPath(i.path).name for i in loc.filesystem.get_file_info(selector)
                    if i.type == pafs.FileType.Directory]
        older = sorted((n for n in siblings if n.startswith(SIBLING_PREFIX) and n < path.name), reverse=True)
        found += [Location(loc.filesystem, str(path.parent / n)) for n in older]
    if only is not None:
        found = [c for c in found if _display(c) == only][:1]
        if not found:
            raise CheckpointError(f"checkpoint {only}, chosen by rank 0, is not there for this rank")
    return found


def _load(loc: Location) -> dict[str, Any]:
    """Verify the checkpoint against its manifest, then load its train state and, under "selection", what it
    kept of its cheap-FID selection (`selection.read_saved`); read in place when local."""
    name = _display(loc)
    with _local_copy(loc) as local:
        if not (local / TRAIN_STATE).is_file() and not (local / MANIFEST).is_file():
            what = "does not exist" if not local.exists() else f"has neither {TRAIN_STATE} nor {MANIFEST}"
            raise CorruptCheckpointError(name, f"the folder {what}; resume needs a checkpoint written by isosweep train")
        manifest = verify_checkpoint(local, name)
        if TRAIN_STATE not in manifest["files"]:
            raise CorruptCheckpointError(name, f"its manifest lists no {TRAIN_STATE}")
        state = load_train_state(local, verify=False)
        try:
            state["selection"] = read_saved(local, listed=manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:  # an unreadable JSON or safetensors file
            raise CorruptCheckpointError(name, f"its cheap-FID selection cannot be read: {exc}") from None
        return state


@contextlib.contextmanager
def _local_copy(loc: Location) -> Iterator[Path]:
    """The checkpoint as a local folder: itself on a local disk, else a private temporary copy removed on exit
    (one per worker: concurrent downloads into one shared folder would corrupt each other)."""
    if isinstance(loc.filesystem, pafs.LocalFileSystem):
        yield Path(loc.path)
        return
    with scratch_dir("resume") as tmp:
        if loc.filesystem.get_file_info(loc.path).type != pafs.FileType.Directory:
            yield tmp / "missing"  # nothing there: reported as a folder that does not exist
            return
        pafs.copy_files(loc.path, str(tmp), source_filesystem=loc.filesystem, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


def _display(loc: Location) -> str:
    if isinstance(loc.filesystem, pafs.LocalFileSystem):
        return loc.path
    return f"{loc.filesystem.type_name}://{loc.path}"


def read_manifest(name: str, data: bytes | None) -> dict[str, Any]:
    """The manifest in `data` (the bytes of a manifest.json, None when there is none); CorruptCheckpointError naming
    `name` when it is missing, unreadable or names a file outside the checkpoint."""
    if data is None:
        raise CorruptCheckpointError(name, f"no {MANIFEST} (it is written last: the checkpoint was cut off while "
                                           "being written or copied, or was written before isosweep kept manifests)")
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        ok = manifest.get("format") == MANIFEST_FORMAT and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str) for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(name, f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise CorruptCheckpointError(name, f"{MANIFEST} is not an isosweep manifest ({MANIFEST_FORMAT})")
    for rel in files:
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise CorruptCheckpointError(name, f"{MANIFEST} names a file outside the checkpoint: {rel!r}")
    return manifest


def file_sha256(path: Path) -> str:
    """The sha256 of a file as its manifest records it, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain values (no NumPy objects: weights_only loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": _python_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state() -> list:
    """random.getstate() as plain ints and floats: (version, 625 ints, gauss or None)."""
    version, internal, gauss = random.getstate()
    return [int(version), [int(v) for v in internal], None if gauss is None else float(gauss)]
