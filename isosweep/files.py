"""Files: atomic writes, the one way isosweep puts a file or a folder where a concurrent reader may look, and the one
definition of which files make an image folder (read by the spec's path check and by the datasets).

Caches (the built-in base model, feature networks, reference statistics) and sweep records are read
by other trials and other processes while they are being written. Everything is written beside its
final place and renamed into it, so a reader sees the old entry, the new one, or none, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

# A checkpoint's manifest: every file's size and sha256, its step and the run's total steps; written last
# (training.checkpoint), read to verify a checkpoint and by `isosweep status` for a running trial's progress.
MANIFEST = "manifest.json"

# The files an image_folder dataset is made of: every file under dataset.path with one of these suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def iter_image_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every file under `root` (recursively, unsorted) whose suffix is one of IMAGE_SUFFIXES: an image_folder's images."""
    return (p for p in Path(root).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    mode: the file's permission bits (e.g. 0o600), set on the temporary file before the rename, so the
    file is never readable by others even for a moment; None keeps the umask's default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if mode is None:
            tmp.write_bytes(data)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # exactly `mode`: os.open's is masked by the umask
                f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """`with atomic_directory(final) as tmp:` fill `tmp`; on success it is renamed to `final`.

    When another process created `final` first, its copy is kept and ours discarded (both were made
    from the same cache key), unless `replace=True`. On an exception nothing is left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SCRATCH_PREFIX = "isosweep-scratch-"  # <tmp>/isosweep-scratch-<pid>-<kind>-<random>: whose process made it


@contextlib.contextmanager
def scratch_dir(kind: str) -> Iterator[Path]:
    """A private temporary folder (a checkpoint on its way to storage, a downloaded one), removed on exit. Its name
    carries this process's id, so a folder a killed process left behind (a whole model) is found and removed by
    `remove_orphaned_scratch`."""
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{kind}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphaned_scratch(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove this user's scratch folders under `root` (the temporary folder) whose process no longer runs on this
    machine; returns them. Folders of live processes, of other users and of other names are left alone."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and path.is_dir() and path.stat().st_uid == os.getuid() and not _running(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
