"""Natural-photo datasets in the layouts the paper's specs read, cut from the photographs scikit-learn ships.

Tests cannot download CelebA-HQ, CIFAR-10 or LSUN. `build_photo_datasets` crops `china.jpg` and `flower.jpg`
(`sklearn.datasets.load_sample_images()`, 640x427 each) at varied positions and scales, flips half of
the crops, and writes them as each spec's comments describe its data:

- `celebahq256/`: `0.png`, `1.png`, ... at 256x256 (CelebA-HQ's numbering), with
  `CelebAMask-HQ-attribute-anno.txt` in CelebAMask-HQ's format (line 1 the count, line 2 the attribute
  names, then `<n>.jpg v_1 ... v_A` with -1/1: the rows name `.jpg` files as the real file does, the images
  are `.png`, so the loader's extension-free match is what pairs them);
- `cifar10/train/<class>/<nnnnn>.png` at 32x32 (an image export of the training set, one folder per class;
  the class is the photograph the crop came from);
- `lsun/church_outdoor_train/` and `lsun/bedroom_train/`: what LSUN's `data.py export` writes, `<key>.webp`
  under six folders named by the key's first six characters (`a/b/c/d/e/f/abcdef....webp`), 40-hex keys,
  images with the short side 256 and the long side up to 1.5x that (LSUN's images are not square).

Labels with a known answer, from what each crop shows: `from_flower` (the crop comes from flower.jpg),
`bright` (mean luminance above the folder's median) and `warm` (mean red minus mean blue above the
folder's median). `celebahq256_heldout/` holds further crops, never trained on, labelled against the
training folder's medians, to score the attribute classifier isosweep trains from the labels file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ATTRIBUTES = ("from_flower", "bright", "warm")
ANNO_FILE = "CelebAMask-HQ-attribute-anno.txt"
_PHOTOS = ("china.jpg", "flower.jpg")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's sample photographs by file name, uint8 (427, 640, 3)."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = {Path(f).name: img for f, img in zip(data.filenames, data.images)}
    return {name: photos[name] for name in _PHOTOS}


@dataclass
class Crop:
    image: Image.Image
    source: str  # the photograph's file name
    luminance: float  # mean ITU-R 601 luma of the written image, 0..255
    warmth: float  # mean red minus mean blue of the written image


def make_crops(n: int, *, seed: int, size: tuple[int, int] | int, max_aspect: float = 1.0) -> list[Crop]:
    """`n` crops alternating between the two photographs: random scale (30-100% of the short side), position,
    aspect (1..max_aspect, landscape) and horizontal flip, resized so the short side is `size` (or to `size`
    exactly when it is a pair), then exposed to a random mean luminance (60..160), so brightness does not
    tell the photographs apart (flower.jpg is the darker one)."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        name = _PHOTOS[i % 2]
        photo = photos[name]
        h, w = photo.shape[:2]
        aspect = float(rng.uniform(1.0, max_aspect))
        side = int(rng.uniform(0.3, 1.0) * min(h, w / aspect))
        cw = int(side * aspect)
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(photo[top:top + side, left:left + cw])
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if isinstance(size, int):
            out = (round(size * cw / side), size)
        else:
            out = size
        im = im.resize(out, Image.Resampling.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(im, dtype=np.float64)
        gain = rng.uniform(60.0, 160.0) / (arr @ _LUMA).mean()  # exposure: a random mean luminance, whichever photograph
        arr = np.clip(arr * gain, 0, 255).round()
        im = Image.fromarray(arr.astype(np.uint8))
        luma = float((arr @ _LUMA).mean())
        crops.append(Crop(im, name, luma, float(arr[..., 0].mean() - arr[..., 2].mean())))
    return crops


def crop_labels(crops: list[Crop], thresholds: tuple[float, float] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """(n, 3) 0/1 labels in ATTRIBUTES order and the (luminance, warmth) thresholds used: the folder's medians
    unless given."""
    lum = np.array([c.luminance for c in crops])
    warm = np.array([c.warmth for c in crops])
    if thresholds is None:
        thresholds = (float(np.median(lum)), float(np.median(warm)))
    labels = np.stack([[c.source == "flower.jpg" for c in crops], lum > thresholds[0], warm > thresholds[1]], axis=1)
    return labels.astype(np.uint8), thresholds


def write_celeba_anno(path: Path, files: list[str], labels: np.ndarray, names: tuple[str, ...] = ATTRIBUTES) -> Path:
    """CelebAMask-HQ's attribute file: the count, the names, then `<file> v_1 ... v_A` with -1/1."""
    rows = [f"{f} {' '.join('1' if v else '-1' for v in row)}" for f, row in zip(files, labels)]
    path.write_text("\n".join([str(len(files)), " ".join(names), *rows]) + "\n")
    return path


def _write_celebahq(folder: Path, crops: list[Crop], labels: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, c in enumerate(crops):
        c.image.save(folder / f"{i}.png")
    return write_celeba_anno(folder / ANNO_FILE, [f"{i}.jpg" for i in range(len(crops))], labels)


def _write_lsun(folder: Path, crops: list[Crop]) -> None:
    for c in crops:
        buf = io.BytesIO()
        c.image.save(buf, format="WEBP", quality=90)
        key = hashlib.sha1(buf.getvalue()).hexdigest()
        d = folder.joinpath(*key[:6])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.webp").write_bytes(buf.getvalue())


@dataclass
class PhotoDatasets:
    """Where `build_photo_datasets` put each dataset; `labels` are the celebahq rows' 0/1 values by image file."""

    root: Path
    celebahq: Path
    attributes: Path
    celebahq_heldout: Path
    heldout_attributes: Path
    cifar10: Path
    lsun_church: Path
    lsun_bedroom: Path
    thresholds: tuple[float, float]
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)
    heldout_labels: dict[str, tuple[int, ...]] = field(default_factory=dict)


def build_photo_datasets(root: Path | str, *, celebahq: int = 96, heldout: int = 64, cifar10: int = 128, lsun: int = 64) -> PhotoDatasets:
    """Write every dataset under `root` (about 5 s); sizes are image counts."""
    root = Path(root)
    train = make_crops(celebahq, seed=0, size=256)
    train_labels, thresholds = crop_labels(train)
    anno = _write_celebahq(root / "celebahq256", train, train_labels)
    held = make_crops(heldout, seed=1, size=256)
    held_labels, _ = crop_labels(held, thresholds)
    held_anno = _write_celebahq(root / "celebahq256_heldout", held, held_labels)
    cifar = root / "cifar10" / "train"
    for i, c in enumerate(make_crops(cifar10, seed=2, size=(32, 32))):
        d = cifar / Path(c.source).stem
        d.mkdir(parents=True, exist_ok=True)
        c.image.save(d / f"{i:05d}.png")
    church, bedroom = root / "lsun" / "church_outdoor_train", root / "lsun" / "bedroom_train"
    _write_lsun(church, make_crops(lsun, seed=3, size=256, max_aspect=1.5))
    _write_lsun(bedroom, make_crops(lsun, seed=4, size=256, max_aspect=1.5))
    return PhotoDatasets(root=root, celebahq=anno.parent, attributes=anno, celebahq_heldout=held_anno.parent,
                         heldout_attributes=held_anno, cifar10=cifar, lsun_church=church, lsun_bedroom=bedroom,
                         thresholds=thresholds,
                         labels={f"{i}.png": tuple(int(v) for v in row) for i, row in enumerate(train_labels)},
                         heldout_labels={f"{i}.png": tuple(int(v) for v in row) for i, row in enumerate(held_labels)})


@pytest.fixture(scope="session")
def photo_datasets(tmp_path_factory) -> PhotoDatasets:
    """The photo datasets of `build_photo_datasets`, written once per session."""
    return build_photo_datasets(tmp_path_factory.mktemp("photos"))
