"""Storage URIs: one way to name, join, read and write places that may be a local folder, a shared
file system, or S3 (including S3-compatible servers named by query, `?endpoint_override=HOST:PORT`).

Paths are never joined as strings: `join` puts the new parts into the URI's path and keeps its query
intact, and every read or write goes through `pyarrow.fs` (the file system layer Ray Tune and Train
use), so what isosweep writes and what Ray writes always land in the same place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from isosweep.files import write_bytes_atomic

# schemes whose files only one machine can see: fine for an embedded run, wrong for a multi-node cluster
MACHINE_LOCAL_TRACKING = ("sqlite:", "file:")


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
        write_bytes_atomic(normalize(uri), data)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


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
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    return sorted(PurePosixPath(i.path).name for i in infos if i.type == pafs.FileType.Directory)


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's files under `uri` (overwriting); a no-op when `uri` is that folder."""
    local = Path(local).resolve()
    if not is_remote(uri) and Path(normalize(uri)) == local:
        return
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local: str | os.PathLike) -> Path:
    """Copy everything under `uri` into the local folder `local`; returns it."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


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
