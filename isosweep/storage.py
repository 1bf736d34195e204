"""Storage URIs: one way to name, join, read and write places that may be a local folder, a shared
file system, or S3 (including S3-compatible servers named by query, `?endpoint_override=HOST:PORT`).

Paths are never joined as strings: `join` puts the new parts into the URI's path and keeps its query
intact, and every read or write goes through `pyarrow.fs` (the file system layer Ray Tune and Train
use), so what isosweep writes and what Ray writes always land in the same place.

What isosweep writes on a local disk is private to its user: files 0600, the folders it creates 0700
(state files, specs and reports name storage and tracking URIs; a shared machine's other users must not
read them). Object stores keep their own access control.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from isosweep.files import write_bytes_atomic

# schemes whose files only one machine can see: fine for an embedded run, wrong for a multi-node cluster
MACHINE_LOCAL_TRACKING = ("sqlite:", "file:")
PRIVATE_FILE = 0o600  # permission bits of every local file written here
PRIVATE_DIR = 0o700  # and of every local folder created here (existing folders keep theirs)


def is_remote(uri: str) -> bool:
    """A URI with a scheme (s3://, gs://, abfs://...) rather than a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def normalize(uri: str | os.PathLike) -> str:
    """A remote URI unchanged; a local path made absolute (`~` expanded)."""
    uri = str(uri)
    if is_remote(uri):
        return uri
    uri = uri.removeprefix("file://")
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path; a query string (`?endpoint_override=...`) stays at the end."""
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if not is_remote(uri):
        return str(Path(uri, *clean))
    s = urlsplit(uri)
    path = str(PurePosixPath(s.path or "/", *clean)) if clean else s.path
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def name_of(uri: str) -> str:
    """The last part of the path (the sweep id of a sweep URI)."""
    return PurePosixPath(urlsplit(uri).path if is_remote(uri) else uri).name


def parent_of(uri: str) -> str:
    """The URI one level up, query kept."""
    if not is_remote(uri):
        return str(Path(uri).parent)
    s = urlsplit(uri)
    return urlunsplit((s.scheme, s.netloc, str(PurePosixPath(s.path).parent), s.query, s.fragment))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path inside it) for a URI or local path."""
    return pafs.FileSystem.from_uri(normalize(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file: atomically by rename on a local disk, by a single PUT on object stores."""
    if not is_remote(uri):
        path = Path(normalize(uri))
        make_private_dirs(path.parent)
        write_bytes_atomic(path, data, mode=PRIVATE_FILE)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def claim_file(uri: str, data: bytes, may_replace: Callable[[bytes | None], bool], settle_s: float = 2.0) -> bytes | None:
    """Put `data` at `uri` unless another file is there that `may_replace(its bytes or None when unreadable)` keeps:
    None when `data` is the file now, else the bytes of the file that stays.

    On a local or shared disk this is atomic (a complete temporary file hard-linked into place; a replaced file is
    first renamed aside, which one process only can do): of processes racing, one gets None. On an object store
    (no conditional write through pyarrow) it is a look then a PUT, read back after `settle_s`: of two racing
    writers the one whose write stayed gets None."""
    for _ in range(3):
        if _create_exclusive(uri, data):
            break
        held = read_bytes(uri)
        if held is None:  # removed between our two looks
            continue
        if not may_replace(held):
            return held
        if _move_aside(uri) and _create_exclusive(uri, data):
            break
    else:
        return read_bytes(uri) or b""
    if is_remote(uri):
        time.sleep(settle_s)
        now = read_bytes(uri)
        if now != data:
            return now or b""
    return None


def remove_if_same(uri: str, data: bytes) -> bool:
    """Delete the file if it still holds `data`, and its local folder if that is then empty (a file that was the
    first thing written there leaves nothing behind); False when it holds something else or is gone."""
    if read_bytes(uri) != data:
        return False
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)
    if not is_remote(uri):
        with contextlib.suppress(OSError):  # not empty: the folder stays
            Path(path).parent.rmdir()
    return True


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Write a whole file only where none is: True when this call created it (atomic on a local disk only)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        with fs.open_output_stream(path) as f:
            f.write(data)
        return True
    target = Path(path)
    make_private_dirs(target.parent)
    tmp = target.with_name(f".{target.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as f:
            f.write(data)  # complete before it is linked into place
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _move_aside(uri: str) -> bool:
    """Take a file away: on a local disk renamed to a unique name and removed, True only for the one caller whose
    rename took it; on an object store deleted."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)
        return True
    path = Path(normalize(uri))
    aside = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    aside.unlink(missing_ok=True)
    return True


def read_json(uri: str) -> dict | None:
    """The JSON object at `uri`; None when the file does not exist; ValueError when it is not a JSON object."""
    data = read_bytes(uri)
    if data is None:
        return None
    value = json.loads(data)  # ValueError (JSONDecodeError) on a truncated or corrupt file
    if not isinstance(value, dict):
        raise ValueError(f"{uri}: not a JSON object")
    return value


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under `uri` (empty when it does not exist)."""
    return _names(uri, pafs.FileType.Directory)


def list_files(uri: str) -> list[str]:
    """Names of the files directly under `uri` (empty when it does not exist)."""
    return _names(uri, pafs.FileType.File)


def _names(uri: str, kind: pafs.FileType) -> list[str]:
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    return sorted(PurePosixPath(i.path).name for i in infos if i.type == kind)


def make_private_dirs(path: str | os.PathLike) -> Path:
    """Create the local folder `path` and its missing parents, each 0700; folders that exist keep their mode."""
    target = Path(path)
    missing, folder = [], target
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # another process made it first: its mode is its own
            continue
        os.chmod(folder, PRIVATE_DIR)  # exactly 0700: mkdir's mode is masked by the umask
    return target


def make_private(path: str | os.PathLike) -> Path:
    """Make a local file 0600, or every file under a local folder 0600 (folders are left as they are)."""
    path = Path(path)
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, PRIVATE_FILE)
    return path


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's files under `uri` (overwriting); a no-op when `uri` is that folder.

    On a local disk the copies are private: the folders it creates 0700, the files 0600."""
    local = Path(local).resolve()
    dest = None if is_remote(uri) else Path(normalize(uri))
    if dest == local:
        return
    if dest is not None:
        for folder in [local, *sorted(p for p in local.rglob("*") if p.is_dir())]:
            make_private_dirs(dest / folder.relative_to(local))
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if dest is not None:
        for f in local.rglob("*"):
            if f.is_file():
                make_private(dest / f.relative_to(local))


def modified(uri: str) -> float | None:
    """When the file at `uri` was last written (seconds since the epoch), from its listing; None when it is not there."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime is not None else None


def file_sizes(uri: str) -> dict[str, int]:
    """{path relative to `uri`: size in bytes} of every file under `uri`, from the listing alone (empty when none)."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except FileNotFoundError:
        return {}
    root = PurePosixPath(path)
    return {PurePosixPath(i.path).relative_to(root).as_posix(): i.size for i in infos if i.type == pafs.FileType.File}


def download_dir(uri: str, local: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Path:
    """Copy everything under `uri` into the local folder `local` (with `keep`, only the files whose path relative to
    `uri` it accepts); returns it. The copies are private: every file under `local` 0600, the folders the copy
    creates 0700."""
    local = Path(local)
    make_private_dirs(local)
    before = {p for p in local.rglob("*") if p.is_dir()}
    fs, path = filesystem(uri)
    if keep is None:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    for rel in sorted(r for r in file_sizes(uri) if keep is not None and keep(r)):
        make_private_dirs((local / rel).parent)
        with fs.open_input_stream(f"{path.rstrip('/')}/{rel}") as src, open(local / rel, "wb") as dst:
            shutil.copyfileobj(src, dst)
    for folder in (p for p in local.rglob("*") if p.is_dir() and p not in before):
        os.chmod(folder, PRIVATE_DIR)
    return make_private(local)


def staging_dir(uri: str, prefix: str = "isosweep-") -> tuple[Path, bool]:
    """(local folder to write into, whether it is temporary): the folder itself for local storage, else a
    fresh temporary folder whose files are uploaded to `uri` (the caller removes it with `remove_staging`)."""
    if not is_remote(uri):
        return Path(normalize(uri)), False  # created by the first write into it
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{uuid.uuid4().hex[:6]}-")), True


def remove_staging(path: Path, temporary: bool) -> None:
    if temporary:
        shutil.rmtree(path, ignore_errors=True)


def machine_local_reason(uri: str | None, what: str) -> str | None:
    """Why `uri` (a storage path or tracking URI) is visible to one machine only, or None when any node can reach it.

    A local path (relative or absolute) and `sqlite:`/`file:` URIs qualify; an absolute path on a file
    system every node mounts is fine, which only the user can tell (`--shared-fs`).
    """
    if not uri:
        return None
    text = str(uri)
    if what == "tracking" and (text.startswith(MACHINE_LOCAL_TRACKING) or text.startswith(("/", ".", "~"))):
        return f"the {what} URI {text.split('?')[0]!r} is a file on one machine"
    if not is_remote(text) and what == "storage":
        kind = "relative" if not os.path.isabs(os.path.expanduser(text)) else "local"
        return f"the {what} path {text!r} is a {kind} path on one machine"
    return None
