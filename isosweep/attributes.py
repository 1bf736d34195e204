"""Attribute labels for LS on image folders: the labels file, and the classifier isosweep trains from it.

MATH.md section 5 labels generated images with an attribute classifier. For `dataset.kind=shapes` that is
the domain network (`isosweep.backbones`); for an image folder (CelebA-HQ) it is the small CNN here,
trained by isosweep on the folder's images and the per-image labels in `dataset.attributes`, then cached.

Labels file (`read_attributes`), two formats, told apart by the first line:

- CelebA's `list_attr_celeba.txt` (and CelebAMask-HQ's `CelebAMask-HQ-attribute-anno.txt`): whitespace
  separated; line 1 the number of images, line 2 the attribute names, then one `<file> v_1 ... v_A` row
  per image. Line 1 may be left out; line 2 may start with a name for the file column.
- CSV: a header `image,<attr_1>,...,<attr_A>` (any name for the first column), one row per image.

Values are -1/1 or 0/1 (one convention per file); 1 means "has the attribute". Rows are matched to the
images under `dataset.path` by the file name relative to it, else by the base name, else by either
without its extension (`000001.jpg` in the file matches `000001.png` on disk). Images without a row are
left out of training; rows without an image are ignored.

Classifier (`train_attribute_classifier`): `AttributeNet`, four conv stages and one logit per attribute,
trained from scratch with a binary cross-entropy per attribute (`ATTR_RECIPE`) on the labelled images at
min(recipe resolution, dataset.resolution) px. The images go through the dataset's own preprocessing
(resize, centre crop, no flip) at dataset.resolution and then the same antialiased resize that generated
images get, so training and evaluation images take the same path. Cached in
`<evaluation cache>/attributes/<name>/` (model.pt: state dict; info.json: names, resolution, held-out
accuracy, the cache key), where name = `attr-cnn-v1-<hash>` and the hash covers the dataset path and
preprocessing, the labels file's contents, the labelled images (names and sizes), the resolution and the
recipe: equal names mean the same classifier, so LS values are comparable only between equal names.
Written to a temporary directory and renamed into place, so concurrent trials never see half a cache entry.

No Ray or MLflow here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from isosweep.backbones import BackboneUnavailable, _match_resolution
from isosweep.data import IMAGE_SUFFIXES

__all__ = [
    "ATTR_CNN",
    "ATTR_RECIPE",
    "AttributeFileError",
    "AttributeTable",
    "read_attributes",
    "match_images",
    "AttributeNet",
    "fit_attribute_net",
    "AttributeClassifier",
    "train_attribute_classifier",
]

ATTR_CNN = "attr-cnn-v1"  # classifier names are f"{ATTR_CNN}-{hash}"
ATTR_RECIPE = dict(
    version=1,
    resolution=64,  # at most this many px (never above dataset.resolution)
    steps=2000,
    batch_size=64,
    lr=2e-3,
    weight_decay=1e-4,
    seed=0,
    noise=0.05,  # Gaussian pixel noise: robustness to a generator's imperfect images
    flip=False,  # horizontal flips (label-preserving for CelebA's 40 attributes, not for every labelling)
    heldout=0.1,  # fraction of labelled images held out to measure accuracy (none below 20 images)
    max_heldout=2000,
)
_FIX_FORMATS = ("write CelebA's list_attr_celeba.txt format (line 1: count, line 2: attribute names, then "
                "`<file> v_1 ... v_A`) or a CSV with the header `image,<attr_1>,...` and one row per image, values -1/1 or 0/1")


_TOKENS = {"1": 1, "-1": -1, "0": 0, "+1": 1, "1.0": 1, "-1.0": -1, "0.0": 0}


class AttributeFileError(BackboneUnavailable, ValueError):
    """dataset.attributes cannot be used; the message names the file, the line and the fix."""


@dataclass
class AttributeTable:
    """A parsed labels file: `values[i, a]` = 1 when image `images[i]` has attribute `names[a]`, else 0."""

    path: Path
    format: str  # "celeba" (whitespace separated) or "csv"
    names: list[str]
    images: list[str]  # as written in the file, with / separators and no leading ./
    values: np.ndarray  # (N, A) uint8 in {0, 1}
    lines: list[int]  # 1-based line of each row

    def __len__(self) -> int:
        return len(self.images)


def _err(path: Path, line: int | None, msg: str, fix: str) -> AttributeFileError:
    where = f"dataset.attributes {path}" + (f", line {line}" if line is not None else "")
    return AttributeFileError(f"{where}: {msg}; fix: {fix}")


def _norm_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _value(path: Path, line: int, token: str, column: str) -> int:
    tok = token.strip()
    try:
        v = float(tok)
    except ValueError:
        v = None
    if v is None or v not in (-1.0, 0.0, 1.0):
        raise _err(path, line, f"value {tok!r} for attribute {column!r} is not one of -1, 0, 1",
                   "use 1 for 'has the attribute' and -1 or 0 (one convention for the whole file) for 'has not'")
    return int(v)


def _parse_csv(path: Path, lines: list[str]) -> tuple[list[str], list[tuple[int, str, list[str]]], int]:
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(lines)) if any(c.strip() for c in r)]
    (hline, header), body = rows[0], rows[1:]
    header = [c.strip() for c in header]
    while header and header[-1] == "":  # a trailing comma
        header.pop()
    names = header[1:]
    if not names or any(not n for n in names):
        raise _err(path, hline, f"the header {','.join(header)!r} must name the image column and at least one attribute, "
                   "none of them empty", "start the file with `image,<attr_1>,<attr_2>,...`")
    out = []
    for ln, r in body:
        r = [c.strip() for c in r]
        while len(r) > len(header) and r[-1] == "":
            r.pop()
        if len(r) != len(header):
            raise _err(path, ln, f"{len(r)} fields, expected {len(header)} (the image and {len(names)} attributes of the header)",
                       "give every row the image name and one value per attribute, separated by commas")
        out.append((ln, r[0], r[1:]))
    return names, out, hline


def _parse_whitespace(path: Path, lines: list[str]) -> tuple[list[str], list[tuple[int, str, list[str]]], int]:
    rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    count = None
    if len(rows[0][1]) == 1 and rows[0][1][0].isdigit():
        (cline, (tok,)), rows = rows[0], rows[1:]
        count = int(tok)
        if not rows:
            raise _err(path, cline, "the file ends after the image count", "add the line of attribute names and one row per image")
    (hline, names), body = rows[0], rows[1:]
    if count is None and body and len(body[0][1]) == len(names):  # no count line: the header may name the file column
        names = names[1:]
    if not names:
        raise _err(path, hline, "no attribute names", "line 2 (line 1 without the count line) lists the attribute names")
    out = []
    for ln, toks in body:
        if len(toks) != len(names) + 1:
            raise _err(path, ln, f"{len(toks)} fields, expected {len(names) + 1} (the image and {len(names)} attributes of line {hline})",
                       "give every row the image name and one value per attribute, separated by spaces")
        out.append((ln, toks[0], toks[1:]))
    if count is not None and count != len(out):
        raise _err(path, cline, f"the count says {count} images but the file has {len(out)} rows",
                   f"write {len(out)} on line {cline} (or delete that line)")
    return names, out, hline


def read_attributes(path: str | os.PathLike) -> AttributeTable:
    """Parse `dataset.attributes` (module docstring: CelebA's whitespace format or a CSV).

    Raises `AttributeFileError` naming the file, the line and the fix: unreadable file, no rows, a row of the
    wrong length, a value other than -1/0/1, -1 and 0 mixed in one file, an image named twice, a count
    (CelebA's line 1) that disagrees with the rows, duplicate attribute names.
    """
    path = Path(os.path.expanduser(str(path)))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _err(path, None, "no such file", "set dataset.attributes to the labels file's path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _err(path, None, f"cannot be read as text ({exc})", _FIX_FORMATS) from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise _err(path, None, "the file is empty", _FIX_FORMATS)
    fmt = "csv" if "," in first else "celeba"
    names, rows, hline = (_parse_csv if fmt == "csv" else _parse_whitespace)(path, lines)
    if not rows:
        raise _err(path, hline, "a header but no image rows after it", "add one row per image: its file name, then one value per attribute")
    seen_names: dict[str, int] = {}
    for a, n in enumerate(names):
        if n in seen_names:
            raise _err(path, hline, f"attribute {n!r} appears twice in the header (columns {seen_names[n] + 2} and {a + 2})",
                       "give every attribute column its own name")
        seen_names[n] = a
    values = np.empty((len(rows), len(names)), dtype=np.int8)
    images, line_of, first_line_of = [], [], {}
    for i, (ln, image, vals) in enumerate(rows):
        name = _norm_name(image)
        if not name:
            raise _err(path, ln, "the image name is empty", "start every row with the image's file name")
        if name in first_line_of:
            raise _err(path, ln, f"image {name!r} already has a row (line {first_line_of[name]})", "keep one row per image")
        first_line_of[name] = ln
        images.append(name)
        line_of.append(ln)
        try:
            values[i] = [_TOKENS[v] for v in vals]  # fast path (CelebA has 8 million values)
        except KeyError:
            values[i] = [_value(path, ln, v, names[a]) for a, v in enumerate(vals)]
    neg, zero = np.nonzero((values == -1).any(1))[0], np.nonzero((values == 0).any(1))[0]
    if len(neg) and len(zero):
        raise _err(path, int(max(line_of[neg[0]], line_of[zero[0]])),
                   f"the file mixes the -1/1 convention (line {line_of[neg[0]]}) with 0/1 (line {line_of[zero[0]]})",
                   "use -1/1 or 0/1 throughout")
    return AttributeTable(path=path, format=fmt, names=list(names), images=images,
                          values=(values == 1).astype(np.uint8), lines=line_of)


def _strip_suffix(name: str) -> str:
    p = PurePosixPath(name)
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_SUFFIXES else name


def match_images(table: AttributeTable, root: str | os.PathLike, files: list[Path]) -> tuple[list[int], np.ndarray, dict]:
    """Pair image files (under `root`) with the table's rows: by the path relative to root, else the base
    name, else either without its extension. Returns (indices into `files` that have a row, their labels
    (n, A) uint8, counts {'images', 'labelled', 'rows', 'unused_rows'}). Raises `AttributeFileError` when a
    row matches two images or no image matches any row."""
    root = Path(root).expanduser()
    full: dict[str, int] = {}
    noext: dict[str, list[int]] = {}
    for i, name in enumerate(table.images):
        full[name] = i
        noext.setdefault(_strip_suffix(name), []).append(i)
    used: dict[int, Path] = {}
    indices, rows = [], []
    for fi, f in enumerate(files):
        rel = f.relative_to(root).as_posix()
        row = full.get(rel, full.get(f.name))
        if row is None:
            for key in (_strip_suffix(rel), _strip_suffix(f.name)):
                cands = noext.get(key, [])
                if len(cands) > 1:
                    shown = ", ".join(f"line {table.lines[c]}" for c in cands[:3])
                    raise _err(table.path, table.lines[cands[1]], f"image {rel!r} matches several rows without extensions ({shown})",
                               "write the file names with their extensions, as they are under dataset.path")
                if cands:
                    row = cands[0]
                    break
        if row is None:
            continue
        if row in used:
            raise _err(table.path, table.lines[row], f"row {table.images[row]!r} matches two images, "
                       f"{used[row].relative_to(root).as_posix()!r} and {rel!r}",
                       f"write image names relative to dataset.path ({root}), e.g. {rel!r}")
        used[row] = f
        indices.append(fi)
        rows.append(row)
    if not indices:
        ex_files = ", ".join(repr(f.relative_to(root).as_posix()) for f in files[:3])
        ex_rows = ", ".join(repr(n) for n in table.images[:3])
        raise _err(table.path, None, f"none of the {len(files)} images under dataset.path {root} has a row (images: {ex_files}, ...; "
                   f"rows: {ex_rows}, ...)", "name each image as its path relative to dataset.path, or its file name "
                   "(the extension may differ); for CelebA-HQ use labels whose names match the files, e.g. CelebAMask-HQ-attribute-anno.txt")
    stats = {"images": len(files), "labelled": len(indices), "rows": len(table), "unused_rows": len(table) - len(indices)}
    return indices, table.values[rows], stats


# --- the classifier -------------------------------------------------------------------------------


class AttributeNet(nn.Module):
    """(B, 3, R, R) in [-1, 1] -> (B, A) logits: conv stages of 32, 64, 128, 128 channels (the last three
    stride 2) with SiLU, 4x4 average pool, a 256-d layer and one logit per attribute. No normalisation layer:
    a GroupNorm would subtract the mean level of each image, and brightness and colour are attributes."""

    def __init__(self, num_attributes: int) -> None:
        super().__init__()
        self.num_attributes = int(num_attributes)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU())

        self.body = nn.Sequential(stage(3, 32, 1), stage(32, 64, 2), stage(64, 128, 2), stage(128, 128, 2), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(128 * 16, 256), nn.SiLU())
        self.head = nn.Linear(256, self.num_attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _load_images(dataset, indices: list[int], resolution: int, progress: bool) -> torch.Tensor:
    """The dataset's images `indices` (its own preprocessing), resized to `resolution` as generated images
    are, as uint8 (n, 3, r, r)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    workers = 0 if len(indices) < 2048 else min(8, os.cpu_count() or 1)
    loader = DataLoader(Subset(dataset, indices), batch_size=256, num_workers=workers, shuffle=False)
    out = []
    for imgs, _ in tqdm(loader, desc="loading labelled images", disable=not progress, leave=False):
        out.append(_to_uint8(_match_resolution(imgs.float(), resolution)))
    return torch.cat(out)


def fit_attribute_net(images: torch.Tensor, labels: np.ndarray | torch.Tensor, recipe: dict, *,
                      device: torch.device | str = "cpu", progress: bool = False) -> tuple[AttributeNet, dict]:
    """Train an `AttributeNet` on uint8 images (n, 3, r, r) and 0/1 labels (n, A) with `recipe`
    (`ATTR_RECIPE`'s keys). Returns (net on the CPU in eval mode, info: held-out accuracy and majority rate
    per attribute, counts, steps, seconds)."""
    from tqdm.auto import tqdm

    r = recipe
    device = torch.device(device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    n, num_attr = y_all.shape
    g = torch.Generator().manual_seed(int(r["seed"]))
    perm = torch.randperm(n, generator=g)
    n_hold = 0 if n < 20 else min(int(r["max_heldout"]), int(round(r["heldout"] * n)))
    hold, train = perm[:n_hold], perm[n_hold:]
    torch.manual_seed(int(r["seed"]))
    net = AttributeNet(num_attr).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=int(r["steps"]))
    t0 = time.time()
    net.train()
    for _ in tqdm(range(int(r["steps"])), desc=f"training {ATTR_CNN}", disable=not progress, leave=False):
        idx = train[torch.randint(0, len(train), (int(r["batch_size"]),), generator=g)]
        x = _to_float(images[idx])
        if r["noise"]:
            x = x + r["noise"] * torch.randn(x.shape, generator=g)
        if r["flip"]:
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.binary_cross_entropy_with_logits(net(x.to(device)), y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net = net.cpu().eval()
    info: dict = {"train_images": len(train), "heldout_images": n_hold, "steps": int(r["steps"]),
                  "final_loss": round(float(loss.detach()), 4), "train_s": round(time.time() - t0, 1)}
    if n_hold:
        with torch.no_grad():
            pred = torch.cat([(net(_to_float(images[hold[i:i + 256]])) > 0).float() for i in range(0, n_hold, 256)])
        yh = y_all[hold]
        info["heldout_accuracy"] = [round(float(v), 4) for v in (pred == yh).float().mean(0)]
        info["heldout_majority"] = [round(float(v), 4) for v in torch.maximum(yh.mean(0), 1 - yh.mean(0))]
    return net, info


@dataclass
class AttributeClassifier:
    """LS's attribute classifier for an image folder, with the interface of `DomainClassifier`:
    images (B, 3, H, W) in [-1, 1] -> (labels (B, A) long, 1 = has the attribute; confidence (B, A) =
    the probability of that label, in [0.5, 1]). Images are resized to `resolution` first."""

    net: AttributeNet
    resolution: int
    name: str
    attribute_names: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.net.parameters()).device
        p = torch.sigmoid(self.net(_match_resolution(images.float(), self.resolution).to(dev)).float()).cpu()
        labels = (p > 0.5).long()
        return labels, torch.where(labels.bool(), p, 1 - p)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_attribute_classifier(dataset_spec, cache_root: str | os.PathLike, *, attributes: str | os.PathLike | None = None,
                               device: torch.device | str = "cpu", train_device: torch.device | str | None = None,
                               progress: bool = False, **overrides) -> AttributeClassifier:
    """The attribute classifier of an image folder (`dataset_spec`: kind image_folder, path, resolution,
    center_crop, attributes), loaded from `<cache_root>/attributes/<name>/` or trained and cached there.

    `attributes` overrides `dataset_spec.attributes`; `overrides` change `ATTR_RECIPE` entries (and so the
    name). Training runs on `train_device` (default: CUDA when available, else `device`). The returned
    classifier's `info` holds the recipe, held-out accuracy, the cache key and `trained_now` (False when
    it came from the cache). Raises `AttributeFileError` for an unusable labels file or no labelled image.
    """
    from isosweep.data import ImageFolderDataset

    unknown = set(overrides) - set(ATTR_RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; use any of {sorted(ATTR_RECIPE)}")
    recipe = {**ATTR_RECIPE, **overrides}
    src = attributes if attributes is not None else getattr(dataset_spec, "attributes", None)
    if not src:
        raise AttributeFileError("LS on an image folder trains its attribute classifier from per-image labels, and "
                                 "dataset.attributes is not set; fix: set dataset.attributes to CelebA's list_attr_celeba.txt "
                                 "or a CSV `image,<attr_1>,...` (docs/metrics.md, LS), or drop ls from evaluation.metrics")
    table = read_attributes(src)
    dataset = ImageFolderDataset(dataset_spec.path, dataset_spec.resolution, dataset_spec.center_crop, random_flip=False)
    indices, labels, counts = match_images(table, dataset.root, dataset.files)
    if counts["labelled"] < counts["images"] / 2:
        warnings.warn(f"{table.path}: only {counts['labelled']} of the {counts['images']} images under {dataset.root} have labels; "
                      "the attribute classifier trains on those", stacklevel=2)
    resolution = min(int(recipe["resolution"]), int(dataset_spec.resolution))
    matched = hashlib.sha256()
    for i in indices:
        f = dataset.files[i]
        matched.update(f"{f.relative_to(dataset.root).as_posix()}\t{f.stat().st_size}\n".encode())
    key = {"classifier": ATTR_CNN, "dataset_path": str(dataset.root.resolve()), "dataset_resolution": int(dataset_spec.resolution),
           "center_crop": bool(dataset_spec.center_crop), "attributes_sha256": _file_sha256(table.path),
           "attributes_bytes": table.path.stat().st_size, "images_sha256": matched.hexdigest(), "resolution": resolution,
           "recipe": recipe}
    name = f"{ATTR_CNN}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    parent = Path(cache_root).expanduser() / "attributes"
    final = parent / name
    trained_now = False
    if not (final / "model.pt").is_file():
        images = _load_images(dataset, indices, resolution, progress)
        if train_device is None:
            train_device = "cuda" if torch.cuda.is_available() else device
        net, fit_info = fit_attribute_net(images, labels, recipe, device=train_device, progress=progress)
        info = {"name": name, "attribute_names": table.names, "resolution": resolution, "num_attributes": len(table.names),
                "positive_rate": [round(float(v), 4) for v in labels.mean(0)], **counts, **fit_info, "key": key,
                "labels_file": str(table.path), "format": table.format}
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=parent))
        try:
            torch.save(net.state_dict(), tmp / "model.pt")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
            try:
                os.rename(tmp, final)  # atomic; fails when another process got there first
                trained_now = True
            except OSError:
                if not (final / "model.pt").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((final / "info.json").read_text())
    net = AttributeNet(info["num_attributes"])
    net.load_state_dict(torch.load(final / "model.pt", map_location="cpu", weights_only=True))
    for p in net.parameters():
        p.requires_grad_(False)
    info["trained_now"] = trained_now
    info["cache_path"] = str(final)
    return AttributeClassifier(net.to(device).eval(), info["resolution"], name, tuple(info["attribute_names"]), info)
