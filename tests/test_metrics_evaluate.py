"""Backbones and the whole evaluation suite on a tiny model."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from isosweep.evaluation.features import common, domain, standard
from isosweep.evaluation.features import resolver as bb
from isosweep.evaluation.record import EvalResult, format_row
from isosweep.evaluation.suite import evaluate_model, shard_range
from isosweep.spec import DatasetSpec, EvaluationSpec

FAST_DOMAIN = dict(steps=40, batch_size=32, train_size=512)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fast_domain(monkeypatch):
    """A short training recipe for the domain network (its cache key includes the recipe)."""
    monkeypatch.setattr(domain, "_DOMAIN_RECIPE", {**domain._DOMAIN_RECIPE, **FAST_DOMAIN})


def tiny_unet(sample_size: int = 16):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()


def tiny_eval_spec(tmp_path, **kw) -> EvaluationSpec:
    return EvaluationSpec(**{
        "metrics": ["fid", "ppl", "mrtl", "mcn", "vor", "ls"], "backbone": "domain", "cache_dir": str(tmp_path), "batch_size": 16,
        "seed": 3, "fid": {"num_samples": 12, "ddim_steps": 2, "reference_samples": 64},
        "ppl": {"num_samples": 6, "ddim_steps": 2},
        "mrtl": {"num_pairs": 2, "num_points": 3, "ddim_steps": 2},
        "jacobian": {"num_samples": 2, "pool": 2, "timesteps": [999, 100], "memory_budget_mb": 64},
        "ls": {"num_samples": 24, "keep": 12, "ddim_steps": 2, "spaces": ["x_T", "h"]}, **kw,
    })


def test_shard_range_covers_everything_once():
    for n in (0, 1, 7, 10):
        for w in (1, 2, 3):
            idx = [i for r in range(w) for i in range(*shard_range(n, r, w))]
            assert idx == list(range(n))


@pytest.fixture
def no_default_weights(tmp_path, monkeypatch):
    """Move the places the standard weights are looked up besides evaluation.weights_dir (isosweep's private weights
    folder under ISOSWEEP_CACHE for Inception, torch.hub's checkpoints for AlexNet) and clean-fid's download place
    (named in messages, never looked in) into empty folders, so no test sees this machine's downloads.

    The fixture then checks that every place the lookup names lies under tmp_path."""
    cache = tmp_path / "defaults" / "cache"
    shared_tmp = tmp_path / "defaults" / "shared-tmp"
    hub = tmp_path / "defaults" / "torch" / "hub"
    shared_tmp.mkdir(parents=True)
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("ISOSWEEP_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(hub.parent))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(standard, "CLEANFID_DIR", shared_tmp)
    looked_in = standard.missing_weights_message(None, {"inception": None, "alexnet": None})
    places = [Path(p) for line in looked_in.splitlines() if "looked in: " in line for p in line.split("looked in: ")[1].split(", ")]
    assert len(places) == 2 and all(p.is_relative_to(tmp_path) for p in places), looked_in
    return SimpleNamespace(inception=cache / "eval" / "weights", alexnet=hub / "checkpoints", shared_tmp=shared_tmp)


def test_resolve_backbone(tmp_path, no_default_weights):
    """Without weight files: auto falls back to the domain network on shapes, and standard (or auto on an image
    folder) fails naming each missing file and every place it looked."""
    shapes, folder = DatasetSpec(kind="shapes"), DatasetSpec(kind="image_folder", path=str(tmp_path))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    assert standard.find_standard_weights(str(empty)) == {"inception": None, "alexnet": None}
    assert bb.resolve_backbone(EvaluationSpec(backbone="domain"), shapes) == common.DOMAIN_SHAPES
    assert bb.resolve_backbone(EvaluationSpec(backbone="auto", weights_dir=str(empty)), shapes) == common.DOMAIN_SHAPES
    with pytest.raises(common.BackboneUnavailable, match=common.INCEPTION_FILE) as err:
        bb.resolve_backbone(EvaluationSpec(backbone="standard", weights_dir=str(empty)), shapes)
    msg = str(err.value)
    assert common.ALEXNET_FILE in msg and "evaluation.weights_dir" in msg
    for place in (empty / common.INCEPTION_FILE, no_default_weights.inception / common.INCEPTION_FILE,
                  empty / common.ALEXNET_FILE, no_default_weights.alexnet / common.ALEXNET_FILE):
        assert str(place) in msg
    with pytest.raises(common.BackboneUnavailable):
        bb.resolve_backbone(EvaluationSpec(backbone="auto", weights_dir=str(empty)), folder)
    with pytest.raises(common.BackboneUnavailable, match="only for dataset.kind=shapes"):
        bb.resolve_backbone(EvaluationSpec(backbone="domain"), folder)


def test_standard_weights_found_in_weights_dir(tmp_path, no_default_weights):
    """Files in weights_dir are found; a file missing there is found in its default place; one missing
    everywhere makes `standard` fail naming only that file and `auto` fall back to the domain network."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / common.INCEPTION_FILE).write_bytes(b"x")
    found = standard.find_standard_weights(str(weights))
    assert found == {"inception": weights / common.INCEPTION_FILE, "alexnet": None}
    with pytest.raises(common.BackboneUnavailable, match=common.ALEXNET_FILE) as err:
        bb.resolve_backbone(EvaluationSpec(backbone="standard", weights_dir=str(weights)), DatasetSpec())
    assert f"{common.INCEPTION_FILE} (from" not in str(err.value)  # the file that was found is not listed as missing
    assert bb.resolve_backbone(EvaluationSpec(backbone="auto", weights_dir=str(weights)), DatasetSpec()) == common.DOMAIN_SHAPES

    (no_default_weights.inception / common.INCEPTION_FILE).write_bytes(b"x")  # isosweep's private weights folder
    assert standard.find_standard_weights(None)["inception"] == no_default_weights.inception / common.INCEPTION_FILE
    (no_default_weights.alexnet / common.ALEXNET_FILE).write_bytes(b"x")  # torchvision's download place
    assert standard.find_standard_weights(str(weights))["alexnet"] == no_default_weights.alexnet / common.ALEXNET_FILE
    (weights / common.ALEXNET_FILE).write_bytes(b"x")  # weights_dir comes first
    found = standard.find_standard_weights(str(weights))
    assert found == {"inception": weights / common.INCEPTION_FILE, "alexnet": weights / common.ALEXNET_FILE}
    assert bb.resolve_backbone(EvaluationSpec(backbone="auto", weights_dir=str(weights)), DatasetSpec()) == "standard"
    assert bb.resolve_backbone(EvaluationSpec(backbone="standard", weights_dir=str(weights)), DatasetSpec()) == "standard"


def test_inception_in_clean_fids_download_place_is_never_loaded(tmp_path, no_default_weights):
    """A TorchScript file is code: one planted where clean-fid downloads (/tmp, writable by every user) is not
    loaded, and the error says where to put it instead; the private folder it names is created 0700."""
    planted = no_default_weights.shared_tmp / common.INCEPTION_FILE
    planted.write_bytes(b"x")
    (no_default_weights.alexnet / common.ALEXNET_FILE).write_bytes(b"x")
    assert standard.find_standard_weights(None)["inception"] is None
    with pytest.raises(common.BackboneUnavailable, match="clean-fid's download place") as err:
        bb.resolve_backbone(EvaluationSpec(backbone="standard"), DatasetSpec())
    private = no_default_weights.inception
    assert f"{planted} (clean-fid's download place) is not loaded" in str(err.value) and f"move it to {private}/" in str(err.value)
    assert private.is_dir() and stat.S_IMODE(private.stat().st_mode) == 0o700
    assert bb.resolve_backbone(EvaluationSpec(backbone="auto"), DatasetSpec(kind="shapes")) == common.DOMAIN_SHAPES
    planted.rename(private / common.INCEPTION_FILE)  # where the message says it goes
    assert bb.resolve_backbone(EvaluationSpec(backbone="standard"), DatasetSpec()) == "standard"


def test_inception_in_the_private_folder_is_refused_when_others_can_write_it(tmp_path, no_default_weights):
    """The private folder's Inception file is loaded only when it and its folder are this user's and writable by no
    one else; otherwise the error names the file and why. evaluation.cache_dir moves the folder with the cache."""
    (no_default_weights.alexnet / common.ALEXNET_FILE).write_bytes(b"x")
    ev = EvaluationSpec(backbone="standard", cache_dir=str(tmp_path / "spec-cache"))
    private = common.private_weights_dir(ev)
    assert private == tmp_path / "spec-cache" / "weights"
    with pytest.raises(common.BackboneUnavailable, match=str(private / common.INCEPTION_FILE)):
        bb.resolve_backbone(ev, DatasetSpec())  # creates the folder (0700) and names it
    weights = private / common.INCEPTION_FILE
    weights.write_bytes(b"x")
    os.chmod(weights, 0o664)
    with pytest.raises(common.BackboneUnavailable, match="is writable by other users") as err:
        bb.resolve_backbone(ev, DatasetSpec())
    assert f"{weights} is not loaded: it is writable by other users (mode 0664)" in str(err.value)
    assert standard.find_standard_weights(None, private)["inception"] is None
    os.chmod(weights, 0o600)
    assert standard.find_standard_weights(None, private)["inception"] == weights
    os.chmod(private, 0o770)
    assert f"its folder {private} is writable by other users (mode 0770)" in standard.untrusted_reason(weights)
    assert standard.find_standard_weights(None, private)["inception"] is None
    os.chmod(private, 0o700)
    if os.getuid() == 0:  # only root can give a file away: one that another user owns is refused too
        os.chown(weights, 65534, -1)
        assert standard.untrusted_reason(weights).startswith("it belongs to uid 65534")
        assert standard.find_standard_weights(None, private)["inception"] is None
        os.chown(weights, 0, -1)
    assert bb.resolve_backbone(ev, DatasetSpec()) == "standard"


def test_lpips_loads_alexnet_from_a_file(tmp_path):
    # a randomly initialised AlexNet saved like torchvision's checkpoint: LPIPS must use exactly these weights
    from torchvision.models import alexnet

    torch.manual_seed(0)
    state = {k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")}  # all LPIPS reads
    torch.save(state, tmp_path / common.ALEXNET_FILE)
    d = standard.LpipsDistance(tmp_path / common.ALEXNET_FILE)
    assert torch.equal(d.model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(d.model.net.slice5, "10").bias, state["features.10.bias"])
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(d(a, a), torch.zeros(2), atol=1e-7)
    assert (d(a, a.flip(0)) > 0).all()


def test_domain_network_learns_the_factors_and_is_cached(tmp_path, fast_domain):
    net = domain.load_shapes_net(16, tmp_path, **{**FAST_DOMAIN, "steps": 200})
    files = list((tmp_path / "domain").glob(f"{common.DOMAIN_SHAPES}-r16-*.pt"))
    assert len(files) == 1
    info = torch.load(files[0], weights_only=False)["info"]
    # chance is 1/3, 1/4, 1/3, 1/5, 1/5; a short training must beat it clearly on held-out images
    acc = info["heldout_accuracy"]
    assert acc["colour"] > 0.9 and acc["x"] > 0.5 and acc["y"] > 0.5, acc
    again = domain.load_shapes_net(16, tmp_path, **{**FAST_DOMAIN, "steps": 200})  # from the cache: same weights
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)
    from isosweep.data.datasets import ShapesDataset

    imgs = torch.stack([ShapesDataset(8, 16, seed=99)[i][0] for i in range(8)])
    dist = domain.DomainDistance(net, 16)
    assert torch.allclose(dist(imgs, imgs), torch.zeros(8), atol=1e-6)
    assert (dist(imgs, imgs.roll(1, 0)) > 0).all()
    lab, conf = domain.DomainClassifier(net, 16)(imgs)
    assert lab.shape == conf.shape == (8, 5) and ((conf > 0) & (conf <= 1)).all()
    assert domain.DomainFeatures(net, 16)(imgs).shape == (8, 256)


def test_whole_suite_on_a_tiny_model(tmp_path, fast_domain):
    from diffusers import DDPMScheduler

    unet, sched = tiny_unet(16), DDPMScheduler(num_train_timesteps=1000)
    spec = tiny_eval_spec(tmp_path)
    data = DatasetSpec(kind="shapes", resolution=16, size=64)
    reports = []  # the progress callback (the sweep layer turns it into Ray metrics): (share, done, total)
    res = evaluate_model(unet, sched, spec, data, progress=False, on_progress=lambda *r: reports.append(r))
    assert isinstance(res, EvalResult)
    # each share reports its start, every batch (16 samples; PPL 8 pairs; mRTL 4 pairs; Jacobians one group) and its end
    done = {share: [d for s, d, _ in reports if s == share] for share, _, _ in reports}
    totals = {share: {t for s, _, t in reports if s == share} for share in done}
    assert totals == {"fid": {12}, "ppl": {6}, "mrtl": {2}, "jacobian": {4}, "ls": {24}}  # jacobian: 2 samples x 2 t
    assert done == {"fid": [0, 12, 12], "ppl": [0, 6, 6], "mrtl": [0, 2, 2], "jacobian": [0, 2, 4, 4], "ls": [0, 16, 24, 24]}
    intervals = {f"{m}_{b}" for m in ("ppl", "mrtl", "mcn", "vor", "mcn_t100", "vor_t100") for b in ("lo", "hi")}
    assert set(res.metrics) == {"fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_rbf", "ls_h", "ls_h_rbf", "ls_max", "mcn_t100",
                                "vor_t100", "ppl_median", "ppl_p90", "ppl_p99"} | intervals
    for m in ("ppl", "mrtl", "mcn", "vor", "mcn_t100", "vor_t100"):
        assert res.metrics[f"{m}_lo"] <= res.metrics[m] + 1e-9 and res.metrics[m] <= res.metrics[f"{m}_hi"] + 1e-9, m
    assert res.settings["tf32"] is False and res.settings["bootstrap"] == {"resamples": 2000, "level": 0.95}
    assert res.backbones["vor"] == "norm-global_mean" and "vor_t100[norm-global_mean]" in res.keyed_metrics()
    assert all(np.isfinite(v) for v in res.metrics.values()), res.metrics
    assert res.metrics["fid"] > 0 and res.metrics["ppl"] >= 0 and res.metrics["mrtl"] >= 1 - 1e-6
    assert res.metrics["mcn"] >= 1 and res.metrics["vor"] >= 0 and res.metrics["ls"] >= 1
    # every metric names its network; the domain network's name where one is used
    assert res.backbones["fid"] == res.backbones["ppl"] == res.backbones["ls"] == res.backbones["ls_h"] == common.DOMAIN_SHAPES
    assert all(1 <= res.metrics[k] <= res.metrics["ls_max"] + 1e-9 <= 900 for k in ("ls", "ls_h")), res.metrics  # <= 3*4*3*5*5
    assert res.backbones["mcn"] == "none"
    assert "fid[domain-shapes-v1]" in res.keyed_metrics()
    assert len(res.rtl_curve) == 2
    for key in ("samples", "slerp_strip", "lerp_strip"):
        assert res.images[key].dtype == np.uint8 and res.images[key].ndim == 3 and res.images[key].shape[2] == 3
    assert len(res.frame_distances["slerp"]) == len(res.frame_distances["lerp"]) == 8
    assert list((tmp_path / "fid_stats").glob("domain-shapes-v1-*.npz"))
    assert "FID" in format_row(res) and "domain-shapes-v1" in format_row(res)
    # the same seed gives the same numbers (the reference statistics now come from the cache)
    again = evaluate_model(unet, sched, spec, data, metrics=["fid", "mrtl"], progress=False)
    assert again.metrics["fid"] == pytest.approx(res.metrics["fid"], rel=1e-6)
    assert again.metrics["mrtl"] == pytest.approx(res.metrics["mrtl"], rel=1e-6)


def test_per_unit_values_are_saved_and_are_what_the_metrics_were_taken_from(tmp_path, fast_domain):
    """eval/ppl_pairs.npy etc. hold exactly the values PPL, mRTL and MCN (and their intervals) were computed from;
    MCN/VoR at several timesteps equal one-timestep evaluations; TF32 is off inside the evaluation."""
    from diffusers import DDPMScheduler

    from isosweep.evaluation.metrics.confidence import mean_interval, ppl_summary
    from isosweep.evaluation.metrics.ppl import filtered_mean
    from isosweep.evaluation.record import read_record, record_values

    unet, sched = tiny_unet(16), DDPMScheduler(num_train_timesteps=1000)
    data = DatasetSpec(kind="shapes", resolution=16, size=64)
    spec = tiny_eval_spec(tmp_path, bootstrap={"resamples": 500})
    seen = []
    unet.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        res = evaluate_model(unet, sched, spec, data, metrics=["ppl", "mrtl", "mcn", "vor"], progress=False, images=False)
        assert seen and set(seen) == {(False, False)}  # every forward of the evaluation ran without TF32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert set(res.values) == {"ppl_pairs", "mrtl_pairs", "mcn_samples", "mcn_t100_samples"}
    d = res.values["ppl_pairs"]
    assert d.shape == (6,) and res.metrics["ppl"] == filtered_mean(d)
    boot = dict(resamples=500, level=0.95, seed=3)
    assert {k: res.metrics[k] for k in ppl_summary(d, **boot)} == ppl_summary(d, **boot)
    assert res.metrics["mrtl"] == pytest.approx(res.values["mrtl_pairs"].mean(), rel=1e-12)
    assert res.metrics["mcn"] == pytest.approx(res.values["mcn_samples"].mean(), rel=1e-12)
    assert res.metrics["mcn_lo"] == mean_interval("mcn", res.values["mcn_samples"], **boot)["mcn_lo"]
    # written next to metrics.json as plain .npy, read back equal, and the record's intervals survive the round trip
    res.write(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "eval").glob("*.npy")) == [
        "mcn_samples.npy", "mcn_t100_samples.npy", "mrtl_pairs.npy", "ppl_pairs.npy"]
    back = record_values(tmp_path / "ckpt")
    assert all(np.array_equal(back[k], v) for k, v in res.values.items())
    assert read_record(tmp_path / "ckpt").metrics == res.metrics
    # the second timestep alone gives the same MCN and VoR as `mcn_t100` / `vor_t100` (same x_0 and noise at each t)
    one = evaluate_model(unet, sched, tiny_eval_spec(tmp_path, bootstrap={"resamples": 500}, jacobian={
        "num_samples": 2, "pool": 2, "timesteps": [100], "memory_budget_mb": 64}), data, metrics=["mcn", "vor"],
        progress=False, images=False)
    assert one.metrics["mcn"] == pytest.approx(res.metrics["mcn_t100"], rel=1e-9)
    assert one.metrics["vor"] == pytest.approx(res.metrics["vor_t100"], rel=1e-9)
    assert "mcn_t100" not in one.metrics
    # VoR in the paper's form (Eq. 11, raw singular values) is named as such
    paper = evaluate_model(unet, sched, tiny_eval_spec(tmp_path, jacobian={
        "num_samples": 2, "pool": 2, "timesteps": [100], "vor_norm": "paper", "memory_budget_mb": 64}), data,
        metrics=["vor"], progress=False, images=False)
    assert paper.backbones["vor"] == "norm-paper" and paper.metrics["vor"] != pytest.approx(one.metrics["vor"])


@pytest.mark.gpu
def test_whole_suite_on_a_gpu_gives_the_cpus_numbers(tmp_path, fast_domain):
    """Every metric runs on CUDA (the probes, pairs and perturbations are drawn by CPU generators, as in training:
    a draw made on the wrong device fails here) and, with TF32 off, lands where the CPU's does."""
    from diffusers import DDPMScheduler

    unet, sched = tiny_unet(16), DDPMScheduler(num_train_timesteps=1000)
    spec = tiny_eval_spec(tmp_path)
    data = DatasetSpec(kind="shapes", resolution=16, size=64)
    cpu = evaluate_model(unet, sched, spec, data, progress=False, device="cpu")
    gpu = evaluate_model(unet.cuda(), sched, spec, data, progress=False, device="cuda")
    assert set(gpu.metrics) == set(cpu.metrics) and gpu.backbones == cpu.backbones
    assert all(np.isfinite(v) for v in gpu.metrics.values()), gpu.metrics
    for k in ("fid", "mrtl", "mcn", "vor", "ls"):
        assert gpu.metrics[k] == pytest.approx(cpu.metrics[k], rel=0.05), (k, gpu.metrics[k], cpu.metrics[k])
    assert gpu.metrics["ppl"] == pytest.approx(cpu.metrics["ppl"], rel=0.10)  # finite differences at eps = 1e-4


def test_ppl_by_jvp_in_the_suite_is_recorded_with_its_method_and_meets_the_finite_difference(tmp_path, fast_domain):
    """`evaluation.ppl.method: jvp` through `evaluate_model`: the same pairs as the finite difference, recorded with
    its settings; on a float32 model each pair lands near the finite difference at the default eps."""
    from diffusers import DDPMScheduler

    unet, sched = tiny_unet(16), DDPMScheduler(num_train_timesteps=1000)
    data = DatasetSpec(kind="shapes", resolution=16, size=64)
    fd = evaluate_model(unet, sched, tiny_eval_spec(tmp_path, metrics=["ppl"]), data, progress=False, images=False)
    spec = tiny_eval_spec(tmp_path, metrics=["ppl"], ppl={"num_samples": 6, "ddim_steps": 2, "method": "jvp"})
    jvp = evaluate_model(unet, sched, spec, data, progress=False, images=False)
    assert jvp.settings["ppl"]["method"] == "jvp" and fd.settings["ppl"]["method"] == "finite_difference"
    assert jvp.backbones["ppl"] == fd.backbones["ppl"] == common.DOMAIN_SHAPES
    ratio = jvp.values["ppl_pairs"] / fd.values["ppl_pairs"]
    assert len(ratio) == 6 and np.all(np.abs(ratio - 1) < 0.05), ratio
    assert not np.array_equal(jvp.values["ppl_pairs"], fd.values["ppl_pairs"])  # the suite ran the other method
    assert jvp.metrics["ppl_lo"] <= jvp.metrics["ppl"] <= jvp.metrics["ppl_hi"]


@pytest.mark.gpu
def test_ppl_by_jvp_on_a_gpu_in_each_precision_lands_on_the_cpus_value(tmp_path, fast_domain):
    """On CUDA, PPL by forward-mode differentiation in fp32, TF32 and bf16 against the CPU's fp32 value per pair."""
    from diffusers import DDPMScheduler

    unet, sched = tiny_unet(16), DDPMScheduler(num_train_timesteps=1000)
    data = DatasetSpec(kind="shapes", resolution=16, size=64)

    def spec(precision):
        return tiny_eval_spec(tmp_path, metrics=["ppl"], ppl={"num_samples": 6, "ddim_steps": 2, "method": "jvp",
                                                              "precision": precision})

    cpu = evaluate_model(unet, sched, spec("fp32"), data, progress=False, images=False, device="cpu").values["ppl_pairs"]
    unet = unet.cuda()
    for precision, rel in (("fp32", 1e-3), ("tf32", 0.02), ("bf16", 0.1)):
        gpu = evaluate_model(unet, sched, spec(precision), data, progress=False, images=False, device="cuda")
        assert np.all(np.abs(gpu.values["ppl_pairs"] / cpu - 1) < rel), (precision, gpu.values["ppl_pairs"], cpu)
