"""Training images: the built-in `shapes` problem, image folders, and per-worker shards.

`shapes` renders one coloured shape on a black background from five integer factors (shape, colour,
size, x, y), deterministically from a seed, so the generative factors of every image are known. It is
the demo's dataset, the built-in base model's training set, and the labels behind LS.

Sharding: `ShardSampler` gives each of `world_size` workers a disjoint, equally long slice of one
seeded permutation per epoch (no worker sees an image twice per epoch, and every worker runs the same
number of batches, which DDP needs). The permutation depends only on (seed, epoch), so a resumed run
that skips the batches it already consumed reproduces the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from isosweep.data.imagefiles import list_images, read_rgb
from isosweep.files import IMAGE_SUFFIXES

# shapes: the factor values, as fractions of the image side where they are lengths
SHAPE_NAMES = ("circle", "square", "triangle")
COLOURS = {  # RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SIZES = (0.10, 0.14, 0.18)  # half-width of the shape / image side
POSITIONS = (0.27, 0.385, 0.5, 0.615, 0.73)  # shape centroid / image side, for x and for y
BACKGROUND = -1.0


@dataclass(frozen=True)
class Factor:
    name: str
    values: tuple

    @property
    def num_classes(self) -> int:
        return len(self.values)


SHAPE_FACTORS = (
    Factor("shape", SHAPE_NAMES),
    Factor("colour", tuple(COLOURS)),
    Factor("size", SIZES),
    Factor("x", POSITIONS),
    Factor("y", POSITIONS),
)


def render_shape(labels: Sequence[int], resolution: int = 32) -> np.ndarray:
    """Draw one shape; `labels` = (shape, colour, size, x, y) class indices.

    Returns a float32 array (3, resolution, resolution) in [-1, 1]. The shape's pixel centroid sits at
    (POSITIONS[x], POSITIONS[y]) * resolution (up to pixelisation): the triangle is placed by its
    centroid, not its bounding box.
    """
    shape, colour, size, xi, yi = (int(v) for v in labels)
    res = resolution
    r = SIZES[size] * res
    cx, cy = POSITIONS[xi] * res, POSITIONS[yi] * res
    # pixel centres
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if SHAPE_NAMES[shape] == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif SHAPE_NAMES[shape] == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # upright isosceles triangle, height 2r, base 2r, centroid at (cx, cy)
        h = 2.0 * r
        top, bottom = -2.0 * h / 3.0, h / 3.0
        frac = (dy - top) / h  # 0 at the apex, 1 at the base
        mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * r)
    img = np.full((3, res, res), BACKGROUND, dtype=np.float32)
    rgb = COLOURS[SHAPE_FACTORS[1].values[colour]]
    for c in range(3):
        img[c][mask] = rgb[c]
    return img


class ShapesDataset(Dataset):
    """`size` images of one coloured shape each, factors drawn uniformly and independently from `seed`.

    `__getitem__(i) -> (image (3, R, R) float32 in [-1, 1], labels LongTensor (5,))`, labels ordered as
    `factor_names`. Deterministic: the same (size, resolution, seed) gives the same images.
    """

    factor_names: tuple[str, ...] = tuple(f.name for f in SHAPE_FACTORS)
    num_classes: tuple[int, ...] = tuple(f.num_classes for f in SHAPE_FACTORS)

    def __init__(self, size: int, resolution: int = 32, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"ShapesDataset needs size >= 1 (got {size})")
        self.size, self.resolution, self.seed = size, resolution, seed
        rng = np.random.default_rng(seed)
        self.labels = np.stack([rng.integers(0, k, size=size) for k in self.num_classes], axis=1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lab = self.labels[index]
        return torch.from_numpy(render_shape(lab, self.resolution)), torch.as_tensor(lab, dtype=torch.long)


class ImageFolderDataset(Dataset):
    """Every jpg/png/webp under `root` (recursively, sorted), decoded by `imagefiles.read_rgb` (16-bit scaled,
    transparency on white; a truncated file raises `ImageFileError` naming it), resized and cropped to a square.

    center_crop: resize the short side to `resolution`, then crop the centre; otherwise resize the whole
    image to resolution x resolution. random_flip: horizontal flip with probability 1/2, decided from
    (seed, epoch, index) so a resumed run flips the same images (call `set_epoch`).
    `__getitem__(i) -> (image (3, R, R) float32 in [-1, 1], labels LongTensor (0,))`.
    """

    factor_names: tuple[str, ...] = ()
    num_classes: tuple[int, ...] = ()

    def __init__(self, root: str | Path, resolution: int, center_crop: bool = True,
                 random_flip: bool = True, seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; set dataset.path to the image root")
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}; "
                "set dataset.path to a directory tree of images"
            )
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.asarray(fit_square(read_rgb(self.files[index]), self.resolution, self.center_crop), dtype=np.float32)
        if self.random_flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            arr = arr[:, ::-1]
        return _to_tensor(arr), torch.zeros(0, dtype=torch.long)


def fit_square(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """An image at resolution x resolution, as the training data is made (bicubic): the short side to `resolution`
    and the centre cropped, or (center_crop=False) the whole image resized, its aspect ratio lost."""
    res = resolution
    if not center_crop:
        return image.resize((res, res), Image.BICUBIC)
    w, h = image.size
    s = res / min(w, h)
    image = image.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - res) // 2, (h - res) // 2
    return image.crop((left, top, left + res, top + res))


def load_image(path: str | Path, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """One image file as an image folder's training images load (`read_rgb`, `fit_square`; never flipped):
    (3, R, R) float32 in [-1, 1]. Raises `ImageFileError` naming a file that cannot be decoded or is missing."""
    return _to_tensor(np.asarray(fit_square(read_rgb(path), resolution, center_crop), dtype=np.float32))


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) values 0..255 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0


def build_dataset(dataset_spec, train: bool = True) -> Dataset:
    """The dataset a `DatasetSpec` describes; `train=False` turns random flips off."""
    if dataset_spec.kind == "shapes":
        return ShapesDataset(dataset_spec.size, dataset_spec.resolution, dataset_spec.seed)
    if dataset_spec.kind == "image_folder":
        return ImageFolderDataset(dataset_spec.path, dataset_spec.resolution, dataset_spec.center_crop,
                                  dataset_spec.random_flip and train, seed=dataset_spec.seed)
    raise ValueError(f"unknown dataset.kind {dataset_spec.kind!r}; use shapes or image_folder")


class ShardSampler(Sampler[int]):
    """Like `DistributedSampler` (shuffle, drop_last): worker `rank`'s share of a seeded permutation.

    Every worker gets `len(self)` = floor(n / world_size) distinct indices per epoch; the permutation
    depends only on (seed, epoch). `start` skips that many of this worker's indices (resume mid-epoch).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} workers")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This worker's full index list for the current epoch (ignoring `start`)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per = self.num_samples // self.world_size
        return order[self.rank * per:(self.rank + 1) * per]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start


class ShardedLoader:
    """Batches of one worker's shard: `epoch_batches(epoch, start_batch)` yields (images, labels).

    `batches_per_epoch` is the same on every worker (the remainder of the shard is dropped), and batch
    k of epoch e is always the same images, so resuming at (e, k) continues the same order.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed)
        self.batches_per_epoch = (len(dataset) // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset has {len(dataset)} images: too few for {world_size} worker(s) x batch {batch_size}; "
                "lower train.global_batch_size or use a bigger dataset"
            )

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.num_workers, persistent_workers=False,
        )
        for i, batch in enumerate(loader):
            if start_batch + i >= self.batches_per_epoch:
                return
            yield batch
