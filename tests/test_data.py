"""The shapes dataset, image folders and per-worker shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isosweep.data.datasets import POSITIONS, ImageFolderDataset, ShapesDataset, ShardedLoader, ShardSampler, build_dataset, render_shape
from isosweep.spec import DatasetSpec


def test_shapes_deterministic_per_seed():
    a, b, c = ShapesDataset(16, 32, seed=3), ShapesDataset(16, 32, seed=3), ShapesDataset(16, 32, seed=4)
    for i in range(16):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(16))
    img, lab = a[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert lab.dtype == torch.long and lab.shape == (5,)
    assert a.factor_names == ("shape", "colour", "size", "x", "y") and a.num_classes == (3, 4, 3, 5, 5)


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_labels_match_images(resolution):
    """The shape's pixel centroid is nearest its x/y position class; its colour is the colour class."""
    ds = ShapesDataset(200, resolution, seed=1)
    centres = np.array(POSITIONS) * resolution
    for i in range(len(ds)):
        img, lab = ds[i]
        mask = (img > -1).any(0).numpy()
        assert mask.sum() > 0
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        assert np.argmin(abs(centres - cx)) == lab[3], (i, cx, lab)
        assert np.argmin(abs(centres - cy)) == lab[4], (i, cy, lab)
        # every shape pixel carries the factor's colour
        rgb = img[:, ys[0], xs[0]]
        from isosweep.data.datasets import COLOURS
        assert torch.equal(rgb, torch.tensor(list(COLOURS.values())[lab[1]]))


def test_shape_classes_differ_in_area():
    """Same position and size: square > circle > triangle in area; sizes grow with the size class."""
    area = lambda lab: (render_shape(lab, 32) > -1).any(0).sum()
    sq, ci, tri = area((1, 0, 2, 2, 2)), area((0, 0, 2, 2, 2)), area((2, 0, 2, 2, 2))
    assert sq > ci > tri
    assert area((0, 0, 0, 2, 2)) < area((0, 0, 1, 2, 2)) < area((0, 0, 2, 2, 2))


def test_shard_sampler_disjoint_and_covering():
    n, world = 103, 4
    seen = []
    for rank in range(world):
        s = ShardSampler(n, rank, world, seed=7)
        s.set_epoch(2)
        idx = list(s)
        assert len(idx) == n // world == len(s)
        seen += idx
    assert len(set(seen)) == len(seen) == (n // world) * world  # no image twice in an epoch
    s0 = ShardSampler(n, 0, world, seed=7)
    s0.set_epoch(2)
    s0b = ShardSampler(n, 0, world, seed=7)
    s0b.set_epoch(3)
    assert list(s0) != list(s0b)  # reshuffled per epoch
    s0.set_epoch(2, start=5)
    assert list(s0) == seen[5:n // world]  # resume skips what was consumed


def test_sharded_loader_resume_order():
    ds = ShapesDataset(40, 8, seed=0)
    loader = ShardedLoader(ds, batch_size=4, rank=1, world_size=2, seed=0)
    assert loader.batches_per_epoch == 5
    full = [lab for _, lab in loader.epoch_batches(1)]
    tail = [lab for _, lab in loader.epoch_batches(1, start_batch=3)]
    assert len(full) == 5 and len(tail) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[3:], tail))


def test_image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "b" / "y.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "z.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16, center_crop=True, random_flip=False)
    assert len(ds) == 3
    for i in range(3):
        img, lab = ds[i]
        assert img.shape == (3, 16, 16) and img.min() >= -1 and img.max() <= 1 and lab.numel() == 0
    spec = DatasetSpec(kind="image_folder", path=str(tmp_path), resolution=16)
    assert len(build_dataset(spec, train=False)) == 3


def _flip_draws(ds, plain: list[torch.Tensor], epochs: int) -> list[list[bool]]:
    """For each epoch and image: True if `ds` gave the exact horizontal mirror of `plain`, False if `plain` itself."""
    draws = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        row = []
        for i, ref in enumerate(plain):
            img = ds[i][0]
            mirrored = torch.equal(img, ref.flip(-1))
            assert mirrored or torch.equal(img, ref), f"image {i}, epoch {epoch}: neither the image nor its mirror"
            row.append(mirrored)
        draws.append(row)
    return draws


def test_random_flip_mirrors_some_draws_and_never_when_off(tmp_path):
    """random_flip: each (epoch, image) is the exact left-right mirror or the image unchanged, both occur, the
    choice varies by epoch and repeats for the same seed (resume); off, or build_dataset(train=False): never mirrored."""
    from PIL import Image

    n, res, epochs = 4, 16, 8
    for k in range(n):  # no symmetry: a horizontal ramp, a bar at the left edge, a band at the top
        arr = np.zeros((res, res, 3), dtype=np.uint8)
        arr[..., 0] = np.arange(res, dtype=np.uint8)[None, :] * 12
        arr[:, : 2 + k, 1] = 255
        arr[:3, :, 2] = 255
        Image.fromarray(arr).save(tmp_path / f"im{k}.png")
    plain = [ImageFolderDataset(tmp_path, res, center_crop=False, random_flip=False)[i][0] for i in range(n)]
    assert not any(torch.equal(img, img.flip(-1)) for img in plain)  # a flip is visible

    draws = _flip_draws(ImageFolderDataset(tmp_path, res, center_crop=False, random_flip=True, seed=0), plain, epochs)
    flat = [m for row in draws for m in row]
    assert any(flat) and not all(flat), draws
    assert any(len({row[i] for row in draws}) == 2 for i in range(n)), "each image is flipped the same way every epoch"
    again = _flip_draws(ImageFolderDataset(tmp_path, res, center_crop=False, random_flip=True, seed=0), plain, epochs)
    assert again == draws  # decided by (seed, epoch, index): a resumed run flips the same images

    off = _flip_draws(ImageFolderDataset(tmp_path, res, center_crop=False, random_flip=False, seed=0), plain, epochs)
    assert not any(m for row in off for m in row)
    spec = DatasetSpec(kind="image_folder", path=str(tmp_path), resolution=res, center_crop=False, random_flip=True)
    assert any(m for row in _flip_draws(build_dataset(spec), plain, epochs) for m in row)
    assert not any(m for row in _flip_draws(build_dataset(spec, train=False), plain, epochs) for m in row)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 16)


def test_build_dataset_shapes():
    ds = build_dataset(DatasetSpec(kind="shapes", size=10, resolution=16, seed=2))
    assert isinstance(ds, ShapesDataset) and len(ds) == 10 and ds[0][0].shape == (3, 16, 16)


# --- image files: one decoding for the loader and the scan (data/imagefiles.py) ---

def _png(path, array, mode=None):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _truncated_png(path):
    """A real PNG with its second half cut off (random pixels: the compressed data fills the file)."""
    _png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_png_raises_naming_the_file(tmp_path):
    from isosweep.data.imagefiles import ImageFileError, read_rgb

    _png(tmp_path / "good.png", np.zeros((16, 16, 3), np.uint8))
    bad = _truncated_png(tmp_path / "bad.png")
    with pytest.raises(ImageFileError, match="bad.png") as exc:
        read_rgb(bad)
    assert exc.value.path == str(bad) and "validate --deep" in str(exc.value)
    ds = ImageFolderDataset(tmp_path, 16, random_flip=False)
    assert [p.name for p in ds.files] == ["bad.png", "good.png"]
    with pytest.raises(ImageFileError, match="bad.png"):
        ds[0]  # met while loading: named, never a blank image
    assert ds[1][0].shape == (3, 16, 16)
    import pickle  # DataLoader workers and Ray pickle it: rebuilt from (path, reason)
    again = pickle.loads(pickle.dumps(exc.value))
    assert isinstance(again, ImageFileError) and again.path == str(bad) and str(again) == str(exc.value)


def _open_failing_at(monkeypatch, target, offset):
    """`builtins.open` (what Pillow opens a path with) gives `target` a real file whose reads fail with EIO from
    byte `offset` on, as a file on NFS or FUSE does when the server goes away; every other path opens as usual."""
    import builtins
    import errno
    import io

    class FailingReader(io.BufferedReader):
        def read(self, size=-1):
            if self.tell() + (size if size is not None and size >= 0 else 1) > offset:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if str(file) == str(target) and mode == "rb":
            return FailingReader(io.FileIO(file, "rb"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_broken_or_missing_image_is_deterministic_an_io_error_is_not(tmp_path, monkeypatch):
    """Decode errors and a missing file fail the trial at once (retrying finds the same file); an I/O error of the
    storage while reading a good file (EIO) is retried under the failure budget, at the open or mid-decode."""
    import pickle

    from PIL import Image

    from isosweep.data.imagefiles import ImageFileError, ImageReadError, read_rgb, scan_image_folder
    from isosweep.errors import deterministic_cause

    good = _png(tmp_path / "good.png", np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "float.tiff")
    for broken in (_truncated_png(tmp_path / "cut.png"), tmp_path / "text.png", tmp_path / "float.tiff", tmp_path / "gone.png"):
        with pytest.raises(ImageFileError) as exc:
            read_rgb(broken)
        wrapped = RuntimeError("Training failed due to worker errors")
        wrapped.__cause__ = exc.value
        assert deterministic_cause(wrapped) is exc.value, broken

    ds = ImageFolderDataset(tmp_path, 16, random_flip=False)
    index = [p.name for p in ds.files].index("good.png")
    size = good.stat().st_size
    for offset in (0, size // 2):  # fails in Image.open's first read, then inside load()'s decoding
        with monkeypatch.context() as m:
            _open_failing_at(m, good, offset)
            with pytest.raises(ImageReadError) as exc:
                ds[index]
        assert "good.png" in str(exc.value) and "EIO" in str(exc.value) and exc.value.errno == 5
        assert not isinstance(exc.value, ImageFileError) and deterministic_cause(exc.value) is None, offset
        again = pickle.loads(pickle.dumps(exc.value))  # as a DataLoader worker or Ray sends it
        assert type(again) is ImageReadError and str(again) == str(exc.value) and deterministic_cause(again) is None
    assert ds[index][0].shape == (3, 16, 16)  # the storage is back: the same file reads

    # `validate --deep` names the file, and does not cache a scan that met an I/O error
    cache = tmp_path / "scans"
    with monkeypatch.context() as m:
        _open_failing_at(m, good, size // 2)
        flaky = scan_image_folder(tmp_path, cache_dir=cache, progress=False, workers=1)
    assert any(name == "good.png" and "I/O error" in why for name, why in flaky.unreadable)
    later = scan_image_folder(tmp_path, cache_dir=cache, progress=False, workers=1)
    assert not later.cached and "good.png" not in [name for name, _ in later.unreadable]


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    """A 16-bit greyscale PNG of value v loads as round(v * 255 / 65535) in every channel, not 255."""
    from PIL import Image

    from isosweep.data.imagefiles import read_rgb

    v = 30000
    path = _png(tmp_path / "deep.png", np.full((8, 8), v, dtype=np.uint16))
    with Image.open(path) as im:
        assert im.mode == "I;16"
    expected = round(v * 255 / 65535)  # 117
    assert np.asarray(read_rgb(path))[0, 0].tolist() == [expected] * 3
    img, _ = ImageFolderDataset(tmp_path, 8, center_crop=False, random_flip=False)[0]
    assert torch.allclose(img, torch.full((3, 8, 8), expected / 127.5 - 1.0), atol=1e-6)


def test_transparency_is_composited_on_white(tmp_path):
    """RGBA, LA and palette transparency: out = a * colour + (1 - a) * 255 (BACKGROUND_RGB is white)."""
    from PIL import Image

    from isosweep.data.imagefiles import BACKGROUND_RGB, read_rgb

    assert BACKGROUND_RGB == (255, 255, 255)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 255  # opaque
    rgba[0, 2, 3] = 128  # half
    out = np.asarray(read_rgb(_png(tmp_path / "rgba.png", rgba)))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent red is white, not red
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[0, 2, 0] == 255 and abs(int(out[0, 2, 1]) - 127) <= 1 and abs(int(out[0, 2, 2]) - 127) <= 1
    la = np.zeros((2, 2, 2), np.uint8)  # black, transparent
    assert np.asarray(read_rgb(_png(tmp_path / "la.png", la, mode="LA")))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=1)  # index 1 (red) is the transparent colour
    assert np.asarray(read_rgb(tmp_path / "pal.png"))[0, 0].tolist() == [255, 255, 255]
    ds = ImageFolderDataset(tmp_path, 4, center_crop=False, random_flip=False)
    img, _ = ds[[p.name for p in ds.files].index("rgba.png")]
    assert img[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_scan_names_bad_files_counts_conversions_and_is_cached(tmp_path):
    from isosweep.data.imagefiles import scan_image_folder

    root, cache = tmp_path / "images", tmp_path / "cache"
    (root / "sub").mkdir(parents=True)
    _png(root / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(root / "sub" / "deep.png", np.full((8, 8), 1000, dtype=np.uint16))
    _png(root / "alpha.png", np.zeros((8, 8, 4), np.uint8))
    _truncated_png(root / "sub" / "cut.png")
    (root / "fake.jpg").write_text("not an image")
    scan = scan_image_folder(root, cache_dir=cache, progress=False)
    assert scan.files == 5 and not scan.ok and not scan.cached
    assert sorted(name for name, _ in scan.unreadable) == ["fake.jpg", "sub/cut.png"]
    assert scan.conversions == {"16-bit": 1, "alpha": 1}
    assert "2 unreadable" in scan.summary() and "sub/cut.png" in scan.problems()
    again = scan_image_folder(root, cache_dir=cache, progress=False)
    assert again.cached and again.unreadable == scan.unreadable and again.conversions == scan.conversions
    (root / "fake.jpg").unlink()
    _png(root / "sub" / "cut.png", np.zeros((8, 8, 3), np.uint8))  # re-encoded: new size and mtime
    fixed = scan_image_folder(root, cache_dir=cache, progress=False)
    assert fixed.ok and not fixed.cached and fixed.files == 4 and "all readable" in fixed.summary()
    assert scan_image_folder(root, cache_dir=cache, progress=False).cached
