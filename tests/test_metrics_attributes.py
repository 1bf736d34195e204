"""LS on an image folder: the dataset.attributes file and the attribute classifier trained from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isosweep.data import attributes as label_files
from isosweep.evaluation.features import attributes as at
from isosweep.evaluation.features import common
from isosweep.evaluation.features import resolver as bb
from isosweep.spec import DatasetSpec, EvaluationSpec

RES = 16
NAMES = ("Bright", "Left_Red")
FAST = dict(steps=100, batch_size=32, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fast_recipe(monkeypatch):
    """A short training recipe (the cache key, and so the classifier's name, include it)."""
    monkeypatch.setattr(at, "ATTR_RECIPE", {**at.ATTR_RECIPE, **FAST})


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, RES, RES, 3) images and (n, 2) labels: Bright = light background, Left_Red = a red left half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, 2))
    imgs = []
    for bright, red in labels:
        base = 170.0 if bright else 70.0
        img = base + 35.0 * rng.standard_normal((RES, RES, 3))
        if red:
            img[:, : RES // 2, 0] += 70.0
            img[:, : RES // 2, 1:] -= 30.0
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(imgs), labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 labelled PNGs (half in a subfolder), a CelebA-style file keyed by base name, a CSV keyed by relative path."""
    from PIL import Image

    root = tmp_path_factory.mktemp("faces")
    imgs, labels = make_images(64, seed=0)
    rels = []
    for i, img in enumerate(imgs):
        rel = f"sub/{i:03d}.png" if i % 2 else f"{i:03d}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(root / rel)
        rels.append(rel)
    lab_dir = tmp_path_factory.mktemp("labels")
    celeba = lab_dir / "list_attr.txt"
    rows = [f"{rel.split('/')[-1].replace('.png', '.jpg')}  " + "  ".join("1" if v else "-1" for v in lab) for rel, lab in zip(rels, labels)]
    celeba.write_text(f"{len(rows)}\n{' '.join(NAMES)} \n" + "\n".join(rows) + "\n")
    csv = lab_dir / "attrs.csv"
    csv.write_text("image," + ",".join(NAMES) + "\n" + "\n".join(f"{rel},{a},{b}" for rel, (a, b) in zip(rels, labels)) + "\n")
    return {"root": root, "labels": labels, "rels": rels, "celeba": celeba, "csv": csv}


def folder_spec(folder, attributes) -> DatasetSpec:
    return DatasetSpec(kind="image_folder", path=str(folder["root"]), resolution=RES,
                       attributes=None if attributes is None else str(attributes))


# --- the labels file --------------------------------------------------------------------------------


def test_both_formats_parse_to_the_same_labels(folder):
    from isosweep.data.datasets import ImageFolderDataset

    files = ImageFolderDataset(folder["root"], RES).files
    want = {rel: lab for rel, lab in zip(folder["rels"], folder["labels"])}
    for key in ("celeba", "csv"):
        table = label_files.read_attributes(folder[key])
        assert table.format == key and table.names == list(NAMES) and len(table) == 64
        assert table.values.dtype == np.uint8 and set(np.unique(table.values)) == {0, 1}
        idx, labels, counts = label_files.match_images(table, folder["root"], files)
        assert counts == {"images": 64, "labelled": 64, "rows": 64, "unused_rows": 0}
        got = {files[i].relative_to(folder["root"]).as_posix(): lab for i, lab in zip(idx, labels)}
        assert set(got) == set(want)
        assert all((got[k] == want[k]).all() for k in want), key  # celeba: by base name, .jpg matched to .png


def test_a_csv_without_a_count_and_with_pm1_values(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("\ufeffimage_id,Smiling,Young\n./x/1.jpg,-1,1\n2.jpg,1,-1\n")
    t = label_files.read_attributes(p)
    assert t.images == ["x/1.jpg", "2.jpg"] and t.values.tolist() == [[0, 1], [1, 0]]
    w = tmp_path / "b.txt"  # whitespace, no count line, the header naming the file column
    w.write_text("file Smiling Young\n1.jpg 0 1\n2.jpg 1 1\n")
    assert label_files.read_attributes(w).names == ["Smiling", "Young"]


@pytest.mark.parametrize("text, line, words", [
    ("image,Bright,Left_Red\na.png,1,0\nb.png,0,1\nc.png,2,0\n", 4, ["'2'", "Bright"]),
    ("image,Bright,Left_Red\na.png,1,0\nb.png,0\n", 3, ["2 fields", "expected 3"]),
    ("image,Bright,Left_Red\na.png,1,0\na.png,0,1\n", 3, ["line 2", "one row per image"]),
    ("image,Bright,Left_Red\na.png,1,0\nb.png,-1,1\n", 3, ["mixes", "-1/1"]),
    ("3\nBright Left_Red\na.png 1 -1\nb.png -1 -1\n", 1, ["says 3", "2 rows"]),
    ("2\nBright Left_Red\na.png 1 -1\nb.png -1\n", 4, ["2 fields", "expected 3"]),
])
def test_bad_files_name_the_file_the_line_and_the_fix(tmp_path, text, line, words):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(label_files.AttributeFileError) as err:
        label_files.read_attributes(p)
    msg = str(err.value)
    assert str(p) in msg and f"line {line}:" in msg and "fix:" in msg, msg
    for w in words:
        assert w in msg, msg
    assert isinstance(err.value, ValueError)  # load_feature_networks turns it into BackboneUnavailable


def test_no_matching_image_is_an_error(folder, tmp_path):
    from isosweep.data.datasets import ImageFolderDataset

    p = tmp_path / "other.csv"
    p.write_text("image,Bright\nnot_here.png,1\n")
    with pytest.raises(label_files.AttributeFileError, match="dataset.path") as err:
        label_files.match_images(label_files.read_attributes(p), folder["root"], ImageFolderDataset(folder["root"], RES).files)
    assert "not_here.png" in str(err.value) and "000.png" in str(err.value)


# --- the classifier ---------------------------------------------------------------------------------


def test_classifier_learns_the_attributes_and_is_cached(folder, tmp_path, fast_recipe):
    spec = folder_spec(folder, folder["csv"])
    clf = at.train_attribute_classifier(spec, tmp_path)
    assert clf.info["trained_now"] and clf.info["steps"] == FAST["steps"]
    assert clf.name.startswith(at.ATTR_CNN + "-") and clf.attribute_names == NAMES and clf.resolution == RES
    entry = tmp_path / "attributes" / clf.name
    assert sorted(p.name for p in (tmp_path / "attributes").iterdir()) == [clf.name]  # no temporary directory left
    # fresh images, never seen in training: well above chance (1/2) on both attributes
    imgs, labels = make_images(96, seed=1)
    x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1
    lab, conf = clf(x)
    assert lab.shape == conf.shape == (96, 2) and lab.dtype == torch.long
    assert set(lab.unique().tolist()) <= {0, 1} and ((conf >= 0.5) & (conf <= 1)).all()
    acc = (lab.numpy() == labels).mean(0)
    assert (acc > 0.85).all(), acc
    # the same images at another size are resized to the classifier's resolution first
    assert clf(torch.nn.functional.interpolate(x, size=32))[0].shape == (96, 2)

    mtime = (entry / "model.pt").stat().st_mtime_ns
    again = at.train_attribute_classifier(spec, tmp_path)
    assert not again.info["trained_now"] and again.name == clf.name
    assert (entry / "model.pt").stat().st_mtime_ns == mtime
    assert torch.equal(again(x)[1], conf)
    # other labels (one flipped) are another classifier, under another name
    changed = tmp_path / "changed.csv"
    text = folder["csv"].read_text().splitlines()
    rel, a, b = text[1].split(",")
    changed.write_text("\n".join([text[0], f"{rel},{1 - int(a)},{b}", *text[2:]]) + "\n")
    other = at.train_attribute_classifier(spec, tmp_path, attributes=changed)
    assert other.info["trained_now"] and other.name != clf.name


def test_load_feature_networks_needs_dataset_attributes(folder, tmp_path, fast_recipe):
    ev = EvaluationSpec(metrics=["ls"], cache_dir=str(tmp_path), weights_dir=str(tmp_path / "no-weights"))
    with pytest.raises(common.BackboneUnavailable, match="set dataset.attributes"):
        bb.load_feature_networks(ev, folder_spec(folder, None), needs=("ls",))
    nets = bb.load_feature_networks(ev, folder_spec(folder, folder["celeba"]), needs=("ls",))
    assert isinstance(nets.classifier, at.AttributeClassifier)
    assert nets.names["ls"] == nets.classifier.name and nets.classifier.name.startswith(at.ATTR_CNN)


def test_ls_on_an_image_folder(folder, tmp_path, fast_recipe):
    from diffusers import DDPMScheduler, UNet2DModel

    from isosweep.evaluation.suite import evaluate_model

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=RES, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()
    ev = EvaluationSpec(metrics=["ls"], cache_dir=str(tmp_path), weights_dir=str(tmp_path / "no-weights"), batch_size=16, seed=3,
                        fid={"num_samples": 12, "ddim_steps": 2}, ls={"num_samples": 24, "keep": 12, "ddim_steps": 2})
    res = evaluate_model(unet, DDPMScheduler(num_train_timesteps=1000), ev, folder_spec(folder, folder["csv"]),
                         metrics=["ls"], progress=False)
    assert set(res.metrics) == {"ls", "ls_rbf", "ls_max"}
    assert all(np.isfinite(v) and v >= 1 for v in res.metrics.values()), res.metrics
    name = at.train_attribute_classifier(folder_spec(folder, folder["csv"]), tmp_path).name  # from the cache
    assert res.backbones["ls"] == res.backbones["ls_rbf"] == res.backbones["ls_max"] == name, res.backbones
    assert f"ls[{name}]" in res.keyed_metrics()
