"""Image files in: the one decoding of an image folder's files to 8-bit RGB, and the scan that checks a folder.

`read_rgb(path)` is what the dataset loader and the scan both call, so a folder that scans clean loads the
same pixels. Its rules (README "Image folders"):

- the whole file is decoded (`Image.load()`): a truncated or corrupt file raises `ImageFileError`, which
  names the file, never a blank or half image (Pillow's LOAD_TRUNCATED_IMAGES is left off). So does a missing
  file. An I/O error of the storage while reading (EIO, ESTALE, ETIMEDOUT, ENOTCONN, EAGAIN...: an NFS or FUSE
  glitch) raises `ImageReadError` instead, which the sweep retries (`isosweep.errors`): the file may be fine;
- 16-bit greyscale (`I;16`, `I`) is scaled, not clipped: v -> round(v * 255 / 65535). 16-bit colour PNGs
  are decoded by Pillow to 8 bits per channel already (the high byte);
- transparency (RGBA, LA, PA, a palette or greyscale/RGB PNG with a transparent colour) is composited
  onto an opaque white background, BACKGROUND_RGB: out = a * rgb + (1 - a) * 255, per channel;
- every other mode (L, P, CMYK, YCbCr, 1) goes through Pillow's `convert("RGB")`; float images (mode F)
  are refused.

`scan_image_folder(root)` decodes every file once, in threads (Pillow's decoders release the GIL), with a
progress bar, and returns an `ImageScan` naming every unreadable file. The result is cached under
`<cache>/scans/`, keyed by the folder, its file list, sizes and modification times and DECODE_VERSION, so a
second scan of an unchanged folder only lists and stats the files. A scan that met a storage I/O error names
those files too and is not cached: the next scan reads them again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from isosweep.core.progress import progress_bar
from isosweep.files import iter_image_files, read_json, write_json_atomic

BACKGROUND_RGB = (255, 255, 255)  # what transparent pixels are composited onto: opaque white
DECODE_VERSION = 1  # bump when read_rgb's rules change: cached scans (and anything keyed on them) are redone
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # greyscale PNGs of 16 bits per pixel open in these modes
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_FIX = "delete or re-encode it (e.g. open and save it again with an image editor or PIL)"


class ImageFileError(OSError):
    """An image file that cannot be decoded (truncated, corrupt, not an image, unsupported mode); names the file."""

    deterministic = True  # the file stays broken: not retried (isosweep.errors)

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: cannot be read as an image ({reason}); fix: {_FIX}; "
                         "`isosweep validate --deep SPEC` lists every such file of the dataset")

    def __reduce__(self):  # pickled by DataLoader workers and Ray: rebuilt from (path, reason), not the message
        return type(self), (self.path, self.reason)


class ImageReadError(OSError):
    """The storage failed while an image file was read (an OSError with an errno other than a missing file's): not
    the file's fault, so not deterministic; the trial is retried under its failure budget. Names the file."""

    def __init__(self, path: str | os.PathLike, code: int, reason: str) -> None:
        self.path, self.reason = str(path), reason
        name = errno.errorcode.get(code, str(code))
        super().__init__(code, f"{path}: I/O error while reading the image ({name}: {reason}); the storage failed, not "
                               "necessarily the file: retried under search.max_failures")

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # pickled by DataLoader workers and Ray: rebuilt from (path, errno, reason)
        return type(self), (self.path, self.errno, self.reason)


_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)  # no such file (or a folder in its place): the same on every try


def _storage_failure(exc: OSError) -> bool:
    """An OSError of the operating system (it has an errno) other than a missing file. Pillow's own errors of a
    broken file (UnidentifiedImageError, "image file is truncated", decoder errors) carry no errno."""
    return exc.errno is not None and exc.errno not in _MISSING


def list_images(root: str | os.PathLike) -> list[Path]:
    """The image files of an image folder, sorted (the dataset's index order): `files.iter_image_files`."""
    return sorted(iter_image_files(root))


def conversion_of(image: Image.Image) -> str:
    """Which of read_rgb's rules applies to an opened image: '16-bit', 'alpha', 'float' or '' (a plain convert)."""
    if image.mode in _SIXTEEN_BIT:
        return "16-bit"
    if image.mode == "F":
        return "float"
    if image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return "alpha"
    return ""


def to_rgb8(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB by the module's rules (16-bit scaled, transparency on white)."""
    kind = conversion_of(image)
    if kind == "16-bit":
        values = np.asarray(image, dtype=np.float64)  # 0..65535 for a 16-bit PNG
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if kind == "float":
        raise ValueError("floating-point images (mode F) have no agreed range; save it as 8- or 16-bit")
    if kind == "alpha":
        background = Image.new("RGBA", image.size, (*BACKGROUND_RGB, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode the whole file and return it as 8-bit RGB; `ImageFileError` naming the file when it cannot be, or
    `ImageReadError` when the storage failed while reading it."""
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[Image.Image, str]:
    """(the 8-bit RGB image, which rule converted it: `conversion_of`)."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: a truncated file fails here, not as a blank batch later
            return to_rgb8(image), conversion_of(image)
    except OSError as exc:
        if _storage_failure(exc):
            raise ImageReadError(path, exc.errno, exc.strerror or str(exc)) from exc
        raise ImageFileError(path, f"{type(exc).__name__}: {exc}") from None
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageFileError(path, f"{type(exc).__name__}: {exc}") from None


@dataclass
class ImageScan:
    """What a scan of an image folder found. `unreadable`: [relative path, reason] per file that failed."""

    root: str
    files: int
    unreadable: list[list[str]] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)  # '16-bit' / 'alpha' -> how many files
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.files > 0 and not self.unreadable

    def summary(self) -> str:
        """One line: how many files, how many unreadable, what was converted, how long it took."""
        how = "cached" if self.cached else f"{self.seconds:.1f} s"
        text = f"scanned {self.files} image(s) under {self.root} ({how}): "
        text += f"{len(self.unreadable)} unreadable" if self.unreadable else "all readable"
        notes = {"16-bit": "16-bit scaled to 8 bits", "alpha": "with transparency composited on white"}
        extra = [f"{n} {notes.get(k, k)}" for k, n in sorted(self.conversions.items()) if n]
        return text + ("; " + ", ".join(extra) if extra else "")

    def problems(self, limit: int = 20) -> str:
        """The unreadable files, one per line (at most `limit`, then a count)."""
        lines = [f"    {name}: {reason}" for name, reason in self.unreadable[:limit]]
        if len(self.unreadable) > limit:
            lines.append(f"    ... and {len(self.unreadable) - limit} more")
        return "\n".join(lines)


_STORED = {"root", "files", "unreadable", "conversions", "seconds"}  # the fields a cache entry holds


def scan_cache_dir() -> Path:
    """$ISOSWEEP_CACHE/scans, else ~/.cache/isosweep/scans."""
    root = os.environ.get("ISOSWEEP_CACHE")
    return (Path(os.path.expanduser(root)) if root else Path.home() / ".cache" / "isosweep") / "scans"


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """A hash of what decoding `files` (under the folder `root`) gives, without reading them: DECODE_VERSION, the
    folder, and each file's relative path, size and modification time in ns. The scan cache and FID's reference
    statistics are keyed by it, so replacing an image under the same name gives a new key."""
    entries = []
    for p in files:
        st = p.stat()
        entries.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    text = json.dumps([DECODE_VERSION, str(root.resolve()), entries])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _check_one(path: Path) -> tuple[str, str | None, bool]:
    """(conversion kind, None, False) for a readable file, ('', reason, whether the storage failed) for an unreadable one."""
    try:
        return _read(path)[1], None, False
    except ImageFileError as exc:
        return "", exc.reason, False
    except ImageReadError as exc:
        return "", str(exc), True


def scan_image_folder(root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                      workers: int | None = None) -> ImageScan:
    """Decode every image under `root` once with `read_rgb`; the files that fail are named in the result.

    The result is cached in `cache_dir` (default `scan_cache_dir()`) under a key of (DECODE_VERSION, the
    folder, its file list, sizes and mtimes): a second scan of an unchanged folder decodes nothing. Not cached when
    the storage failed while reading a file (`ImageReadError`). `workers`: decoding threads (default min(8, CPUs)). Raises FileNotFoundError when `root` is no folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set dataset.path to the image root")
    start = time.monotonic()
    files = list_images(root)
    cache = Path(cache_dir).expanduser() if cache_dir else scan_cache_dir()
    entry = cache / f"{files_fingerprint(root, files)}.json"
    stored = read_json(entry)
    if stored.get("root") == str(root) and set(stored) == _STORED:
        return ImageScan(**{**stored, "cached": True, "seconds": time.monotonic() - start})
    kinds: Counter[str] = Counter()
    bad: list[list[str]] = []
    storage_failed = False
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            progress_bar(total=len(files), desc=f"scan {root.name or root}", unit="img", disable=not progress) as bar:
        for path, (kind, reason, failed) in zip(files, pool.map(_check_one, files)):
            storage_failed |= failed
            if reason is not None:
                bad.append([path.relative_to(root).as_posix(), reason])
            elif kind:
                kinds[kind] += 1
            bar.update(1)
    scan = ImageScan(str(root), len(files), bad, dict(kinds), time.monotonic() - start)
    if storage_failed:  # an I/O error says nothing lasting about the files: the next scan reads them again
        return scan
    try:
        write_json_atomic(entry, {k: v for k, v in asdict(scan).items() if k in _STORED})
    except OSError:  # a read-only cache only costs the next scan its time
        pass
    return scan
