"""The stand-ins of tests/support: the paper's hub models in a real HF cache, and photo datasets in the specs' layouts.

Other tests run the shipped specs on them, so these check that they are what the real things are where
isosweep reads them: huggingface_hub accepts the cache, `load_unet_and_scheduler` loads each spec's hub id
from it offline (weights and scheduler from the repository's files), the real-size celebahq-256 has the
repository's 113.7 M parameters, every dataset loads through the spec that names it, and the attribute
labels hold what the crops show, well enough for isosweep's attribute classifier to learn them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from PIL import Image
from support.hub import CELEBAHQ, CIFAR10, HUB_IDS, REAL_CELEBAHQ_PARAMS, REPOS, HubCache, build_hub_cache, unet_config
from support.photos import ANNO_FILE, ATTRIBUTES

from isosweep.data.attributes import match_images, read_attributes
from isosweep.data.datasets import ImageFolderDataset, build_dataset
from isosweep.models.loading import load_unet_and_scheduler
from isosweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"celebahq": CELEBAHQ, "cifar10": CIFAR10, "lsun_church": "google/ddpm-ema-church-256",
         "lsun_bedroom": "google/ddpm-ema-bedroom-256"}
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample", "variance_type")


def _spec(name: str, *overrides: str):
    return load_spec(ROOT / "search_spaces" / f"{name}.yaml", list(overrides), check_paths=False)


def _snapshot_file(cache: HubCache, repo_id: str, name: str) -> Path:
    return cache.snapshot(repo_id) / name


def _weights(cache: HubCache, repo_id: str) -> dict[str, torch.Tensor]:
    """The state dict in the repository's first weight file, read as the hub cache holds it."""
    f = _snapshot_file(cache, repo_id, REPOS[repo_id].weights[0])
    return torch.load(f, map_location="cpu", weights_only=True)


def test_the_hub_cache_is_what_huggingface_hub_reads(hub_cache):
    """Every repo: refs/main -> the commit of main, the repository's file list in its snapshot, each file a
    relative symlink to a blob named by the hub's hash of it (git sha1; sha256 for LFS weights)."""
    info = scan_cache_dir(hub_cache.path)
    assert not info.warnings, info.warnings
    assert {r.repo_id for r in info.repos} == set(HUB_IDS)
    for r in info.repos:
        repo = REPOS[r.repo_id]
        assert r.repo_type == "model" and set(r.refs) == {"main"}
        (rev,) = r.revisions
        assert rev.commit_hash == repo.commit and rev.refs == {"main"}
        expected = {"config.json", "scheduler_config.json", "model_index.json", *repo.weights, *repo.other_files}
        assert {f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files} == expected
        for f in rev.files:
            link = os.readlink(f.file_path)
            assert not os.path.isabs(link) and Path(link).parts[-2] == "blobs"
            with open(f.blob_path, "rb") as fh:
                lfs = f.file_name.endswith((".bin", ".safetensors"))
                assert f.blob_path.name == (sha_fileobj(fh).hex() if lfs else git_hash(fh.read()))
        assert try_to_load_from_cache(r.repo_id, "config.json", cache_dir=hub_cache.path) == str(rev.snapshot_path / "config.json")
    for rid in HUB_IDS:  # the configs: the repository's, narrowed
        assert json.loads(_snapshot_file(hub_cache, rid, "config.json").read_text()) == unet_config(rid, "fast")


def test_each_spec_loads_its_hub_id_offline_from_the_cache(hub_cache, monkeypatch):
    """`load_unet_and_scheduler` with base_model.source exactly as each shipped spec writes it: the UNet of the
    cached config and weights (not a fresh init), the scheduler of the repository's scheduler_config.json."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache.path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for name, rid in SPECS.items():
        spec = _spec(name)
        assert spec.base_model.source == rid and spec.base_model.subfolder is None
        unet, sched = load_unet_and_scheduler(spec.base_model, spec.dataset, progress=False)
        cfg = unet_config(rid, "fast")
        for key in ("sample_size", "block_out_channels", "down_block_types", "up_block_types", "norm_num_groups", "layers_per_block"):
            assert list(np.atleast_1d(unet.config[key])) == list(np.atleast_1d(cfg[key])), (rid, key)
        assert unet.config.sample_size == spec.dataset.resolution
        stored = _weights(hub_cache, rid)
        loaded = unet.state_dict()
        assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)
        repo_sched = json.loads(_snapshot_file(hub_cache, rid, "scheduler_config.json").read_text())
        assert {k: sched.config[k] for k in SCHEDULER_KEYS} == {k: repo_sched[k] for k in SCHEDULER_KEYS}


def test_the_scheduler_comes_from_the_repository(tmp_path, monkeypatch):
    """The repositories' scheduler equals the built-in default, so a cache whose scheduler_config.json differs
    shows that the loader reads the file rather than falling back to the default."""
    import huggingface_hub.constants as hf_constants

    changes = {"variance_type": "fixed_large", "beta_end": 0.015, "clip_sample": False}
    cache = build_hub_cache(tmp_path / "hub", (CIFAR10,), scheduler_changes=changes)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _, sched = load_unet_and_scheduler(_spec("cifar10").base_model, progress=False)
    assert {k: sched.config[k] for k in changes} == changes


@pytest.mark.slow
def test_the_env_alone_points_a_process_at_the_cache(hub_cache):
    """What end-to-end tests rely on: a fresh process with `hub_cache.env` (and no hub access) loads every
    spec's hub id, and the stand-in of a repository that is not in the cache fails with the loader's hint."""
    script = (
        "import json, sys\n"
        "from isosweep.spec import BaseModelSpec, load_spec\n"
        "from isosweep.models.loading import load_unet_and_scheduler\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    spec = load_spec(f'search_spaces/{name}.yaml', check_paths=False)\n"
        "    unet, sched = load_unet_and_scheduler(spec.base_model, spec.dataset, progress=False)\n"
        "    out[spec.base_model.source] = [unet.config.sample_size, list(unet.config.block_out_channels)]\n"
        "try:\n"
        "    load_unet_and_scheduler(BaseModelSpec(source='google/ddpm-cat-256'), progress=False)\n"
        "except OSError as exc:\n"
        "    out['missing'] = str(exc)\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub_cache.env, HF_HOME=str(hub_cache.path.parent / "no-hf-home"))
    proc = subprocess.run([sys.executable, "-c", script, *SPECS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for rid in SPECS.values():
        cfg = unet_config(rid, "fast")
        assert out[rid] == [cfg["sample_size"], cfg["block_out_channels"]]
    assert "could not load UNet2DModel 'google/ddpm-cat-256'" in out["missing"] and "hf download" in out["missing"]


def test_the_real_celebahq_stand_in_is_the_repository_config(hub_cache_real, monkeypatch):
    """113.7 M parameters from the repository's own config.json, loaded by its hub id."""
    import huggingface_hub.constants as hf_constants

    assert json.loads(_snapshot_file(hub_cache_real, CELEBAHQ, "config.json").read_text()) == REPOS[CELEBAHQ].unet_config
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache_real.path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    unet, _ = load_unet_and_scheduler(_spec("celebahq").base_model, progress=False)
    n = sum(p.numel() for p in unet.parameters())
    assert n == REAL_CELEBAHQ_PARAMS and round(n / 1e6, 1) == 113.7
    assert list(unet.config.block_out_channels) == [128, 128, 256, 256, 512, 512] and unet.config.sample_size == 256


def test_photo_datasets_load_through_the_specs_that_name_them(photo_datasets):
    """Each folder through its spec (--set dataset.path=...): count, resolution, layout as the spec documents it."""
    d = photo_datasets
    counts = {}
    sets = {"celebahq": [f"dataset.path={d.celebahq}", f"dataset.attributes={d.attributes}"], "cifar10": [f"dataset.path={d.cifar10}"],
            "lsun_church": [f"dataset.path={d.lsun_church}"], "lsun_bedroom": [f"dataset.path={d.lsun_bedroom}"]}
    for name, overrides in sets.items():
        spec = load_spec(ROOT / "search_spaces" / f"{name}.yaml", overrides)  # paths checked
        ds = build_dataset(spec.dataset)
        img, _ = ds[len(ds) - 1]
        assert img.shape == (3, spec.dataset.resolution, spec.dataset.resolution) and -1.0 <= img.min() < img.max() <= 1.0
        counts[name] = len(ds)
    assert counts == {"celebahq": 96, "cifar10": 128, "lsun_church": 64, "lsun_bedroom": 64}
    assert sorted(int(p.stem) for p in d.celebahq.glob("*.png")) == list(range(96))
    assert {p.parent.name for p in d.cifar10.rglob("*.png")} == {"china", "flower"}
    for lsun in (d.lsun_church, d.lsun_bedroom):
        for f in lsun.rglob("*.webp"):
            rel = f.relative_to(lsun).parts
            assert len(rel) == 7 and "".join(rel[:6]) == f.stem[:6] and len(f.stem) == 40
            w, h = Image.open(f).size
            assert min(w, h) == 256 and max(w, h) <= 384


def test_the_labels_file_is_celebamask_hq_format_with_known_answers(photo_datasets):
    """CelebAMask-HQ's layout (count, names, `<n>.jpg v...` in -1/1) matched to the PNGs by isosweep's reader,
    and each label what the image shows: `bright` recomputed from the written file, `from_flower` from
    the colour statistics only flower.jpg has."""
    d = photo_datasets
    lines = d.attributes.read_text().splitlines()
    assert lines[0] == "96" and lines[1].split() == list(ATTRIBUTES) and lines[2].split()[0] == "0.jpg"
    assert {v for line in lines[2:] for v in line.split()[1:]} == {"1", "-1"}
    spec = load_spec(ROOT / "search_spaces" / "celebahq.yaml", [f"dataset.path={d.celebahq}", f"dataset.attributes={d.attributes}"])
    assert Path(spec.dataset.attributes).name == ANNO_FILE
    table = read_attributes(spec.dataset.attributes)
    assert table.format == "celeba" and table.names == list(ATTRIBUTES)
    ds = ImageFolderDataset(spec.dataset.path, spec.dataset.resolution, random_flip=False)
    idx, labels, counts = match_images(table, ds.root, ds.files)
    assert counts["labelled"] == counts["images"] == 96
    by_file = {ds.files[i].name: tuple(int(v) for v in row) for i, row in zip(idx, labels)}
    assert by_file == d.labels
    for f, (flower, bright, warm) in by_file.items():
        arr = np.asarray(Image.open(d.celebahq / f).convert("RGB"), dtype=np.float64)
        assert bright == int((arr @ [0.299, 0.587, 0.114]).mean() > d.thresholds[0]), f
        assert warm == int(arr[..., 0].mean() - arr[..., 2].mean() > d.thresholds[1]), f
    assert np.mean(labels, axis=0).tolist() == [0.5, 0.5, 0.5]  # the medians split each attribute in half


def test_the_attribute_classifier_learns_the_known_labels(photo_datasets, tmp_path):
    """isosweep's LS classifier (`train_attribute_classifier`, shortened recipe) trained from the labels file
    of the celebahq folder labels held-out crops better than the majority class on every attribute."""
    from isosweep.evaluation.features.attributes import train_attribute_classifier

    d = photo_datasets
    spec = load_spec(ROOT / "search_spaces" / "celebahq.yaml", [f"dataset.path={d.celebahq}", f"dataset.attributes={d.attributes}"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clf = train_attribute_classifier(spec.dataset, tmp_path, steps=120, resolution=32, batch_size=32)
    finally:
        torch.set_num_threads(before)
    assert clf.attribute_names == ATTRIBUTES and clf.info["labelled"] == 96
    held = ImageFolderDataset(d.celebahq_heldout, 256, center_crop=True, random_flip=False)
    idx, truth, _ = match_images(read_attributes(d.heldout_attributes), held.root, held.files)
    pred, _ = clf(torch.stack([held[i][0] for i in idx]))
    accuracy = (pred.numpy() == truth).mean(axis=0)
    majority = np.maximum(truth.mean(axis=0), 1 - truth.mean(axis=0))
    assert (accuracy >= majority + 0.15).all(), dict(zip(ATTRIBUTES, zip(accuracy.round(3), majority.round(3))))
