"""Latent diffusion: an LDMPipeline folder loads as a latent UNet plus a frozen codec, fine-tunes in latent space,
checkpoints in its own layout and samples decoded images; with the identity autoencoder the latent path computes
exactly the pixel path's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import VQModel

from isosweep.core.codec import Codec
from isosweep.core.hspace import autodiff_safe
from isosweep.core.sampling import DDIMSampler, initial_noise
from isosweep.evaluation.suite import checkpoint_fid_scorer, evaluate_model, trial_evaluator
from isosweep.models.loading import LatentModelError, load_base, load_local, load_unet_and_scheduler, weights_sha256
from isosweep.spec import BaseModelSpec, DatasetSpec, EvaluationSpec, spec_from_dict
from isosweep.training.loop import _build_run, _optimizer_step, train_loop
from isosweep.training.reporting import LocalReporter, StepStats

pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(model_dir, resolution, evaluation=None, **train):
    t = dict(lambda_iso=0.1, p=0.5, global_batch_size=4, max_steps=2, checkpoint_every=2, report_every=1,
             ema_decay=0.9, learning_rate=1e-3, seed=0)
    t.update(train)
    return spec_from_dict({"name": "t", "base_model": {"source": str(model_dir)},
                           "dataset": {"kind": "shapes", "size": 32, "resolution": resolution},
                           "train": t, "resources": {"workers_per_trial": 1}, **({"evaluation": evaluation} if evaluation else {})})


def test_ldm_folder_loads_as_latent_unet_and_codec(tiny_ldm_dir):
    base = load_base(BaseModelSpec(source=str(tiny_ldm_dir)))
    assert isinstance(base.codec.module, VQModel) and base.codec.name == "vqvae"
    assert not any(p.requires_grad for p in base.codec.module.parameters())
    assert base.unet.config.in_channels == 4 and base.unet.config.sample_size == 8
    # the repository's DDIM schedule, as the DDPM scheduler training uses
    assert base.scheduler.config.beta_schedule == "scaled_linear" and base.scheduler.config.beta_start == 0.0015
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = base.codec.encode(images)
    assert latents.shape == (3, 4, 8, 8)
    raw = base.codec.module.encode(images).latents
    torch.testing.assert_close(latents, raw * base.codec.module.config.scaling_factor)  # scaled as diffusers does
    decoded = base.codec.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    # the pixel-only paths refuse it instead of sampling latents as images
    with pytest.raises(LatentModelError, match="latent diffusion model"):
        load_unet_and_scheduler(BaseModelSpec(source=str(tiny_ldm_dir)))
    with pytest.raises(LatentModelError):
        load_local(tiny_ldm_dir, None)


def test_a_foreign_autoencoder_class_is_refused(tiny_ldm_dir, tmp_path):
    import shutil

    copy = tmp_path / "pipe"
    shutil.copytree(tiny_ldm_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["vqvae"] = ["my_package", "MyAutoencoder"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model_index.json: component 'vqvae' is my_package.MyAutoencoder"):
        load_base(BaseModelSpec(source=str(copy)))


def _steps(run, n):
    stats = StepStats()
    batches = run.loader.epoch_batches(0)
    for step in range(n):
        _optimizer_step(run, batches, step, stats)
    return stats, {k: v.detach().clone() for k, v in run.unet.state_dict().items()}


def test_identity_codec_gives_the_pixel_paths_numbers_bit_for_bit(tiny_model_dir, tmp_path):
    """Known answer: the latent path with the identity autoencoder is the pixel path, loss for loss, weight for weight,
    image for image (iso steps included: p = 0 takes the isometry term on every step)."""
    spec = make_spec(tiny_model_dir, 8, p=0.0, max_steps=3)
    pixel = _build_run(spec, LocalReporter(tmp_path / "a"), None)
    latent = _build_run(spec, LocalReporter(tmp_path / "b"), None)
    latent.codec = Codec.identity()
    (s_pixel, w_pixel), (s_latent, w_latent) = _steps(pixel, 3), _steps(latent, 3)
    a, b = s_pixel.flush(1, pixel.device, 4), s_latent.flush(1, latent.device, 4)
    for key in ("loss", "dsm_loss", "iso_loss", "tr_r"):
        assert np.isfinite(a[key]) and a[key] == b[key], key
    for key in w_pixel:
        assert torch.equal(w_pixel[key], w_latent[key]), key
    x_T = initial_noise(3, (3, 8, 8), seed=1)
    plain = DDIMSampler(pixel.unet.eval(), pixel.scheduler, progress=False)(x_T, 5, capture_h=True)
    decoded = DDIMSampler(pixel.unet, pixel.scheduler, progress=False, codec=Codec.identity())(x_T, 5, capture_h=True)
    assert torch.equal(plain.images, decoded.images) and torch.equal(plain.h, decoded.h)


def test_vq_ldm_fine_tunes_in_latent_space_and_checkpoints_its_layout(tiny_ldm_dir, tmp_path):
    spec = make_spec(tiny_ldm_dir, 16, p=0.0)
    reporter = LocalReporter(tmp_path / "run")
    res = train_loop(spec, reporter)
    assert res.step == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["iso_loss"]) for r in reporter.reports)
    last = reporter.checkpoints[-1]
    index = json.loads((last / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "VQModel"]
    base, trained = load_base(BaseModelSpec(source=str(tiny_ldm_dir))), load_base(BaseModelSpec(source=str(last)))
    frozen, saved = base.codec.module.state_dict(), trained.codec.module.state_dict()
    assert all(torch.equal(frozen[k], saved[k]) for k in frozen)  # the autoencoder is copied, never trained
    assert any(not torch.equal(v, trained.unet.state_dict()[k]) for k, v in base.unet.state_dict().items())
    assert trained.scheduler.config.beta_schedule == "scaled_linear"
    started = json.loads((last / "spec.json").read_text())["base_model"]  # provenance: both networks it started from
    assert started["unet_sha256"] == weights_sha256(base.unet) and started["vqvae_sha256"] == weights_sha256(base.codec.module)
    out = DDIMSampler(trained.unet, trained.scheduler, progress=False, codec=trained.codec)(initial_noise(2, (4, 8, 8), 0), 4,
                                                                                            capture_h=True)
    assert out.images.shape == (2, 3, 16, 16) and out.images.abs().max() <= 1
    assert out.h.shape[:2] == (4, 2)  # the latent UNet's bottleneck at every step



def eval_spec(tmp_path, **kw) -> EvaluationSpec:
    return EvaluationSpec(**{
        "metrics": ["fid", "ppl", "mrtl", "mcn", "vor"], "backbone": "domain", "cache_dir": str(tmp_path), "batch_size": 8,
        "seed": 3, "fid": {"num_samples": 8, "ddim_steps": 2, "reference_samples": 32},
        "ppl": {"num_samples": 4, "ddim_steps": 2}, "mrtl": {"num_pairs": 2, "num_points": 3, "ddim_steps": 2},
        "jacobian": {"num_samples": 2, "pool": 2, "timesteps": [500], "memory_budget_mb": 64}, **kw})


def test_identity_codec_gives_the_pixel_evaluation_exactly(tiny_model_dir, tmp_path, fast_domain):
    """Known answer: the suite with the identity autoencoder (decoded samples, encoded Jacobian inputs, the tangent
    through the decoder) records the pixel model's numbers and images exactly."""
    unet, sched = load_local(tiny_model_dir, None)
    data = DatasetSpec(kind="shapes", resolution=8, size=32)
    for ppl in ({"method": "finite_difference"}, {"method": "jvp"}):
        spec = eval_spec(tmp_path, ppl={"num_samples": 4, "ddim_steps": 2, **ppl})
        plain = evaluate_model(unet, sched, spec, data, progress=False)
        latent = evaluate_model(unet, sched, spec, data, progress=False, codec=Codec.identity())
        assert set(plain.metrics) == set(latent.metrics) and all(np.isfinite(v) for v in plain.metrics.values())
        for key, value in plain.metrics.items():
            assert latent.metrics[key] == value, key
        for key, image in plain.images.items():
            assert np.array_equal(image, latent.images[key]), key
        assert latent.settings["autoencoder"] == "identity" and "autoencoder" not in plain.settings


def test_vq_ldm_trial_is_evaluated_on_decoded_images(tiny_ldm_dir, tmp_path, fast_domain):
    """A latent trial end to end in the loop: fine-tuned, scored by the cheap FID and evaluated by the trial's
    evaluator, which gets the codec: FID/PPL on 16 px decoded images, MCN/VoR/mRTL on the latent UNet."""
    spec = make_spec(tiny_ldm_dir, 16, p=0.0, evaluation=eval_spec(
        tmp_path, metrics=["fid", "ppl", "mrtl", "mcn", "vor", "ls"], ppl={"num_samples": 4, "ddim_steps": 2, "method": "jvp"},
        ls={"num_samples": 16, "keep": 8, "ddim_steps": 2, "spaces": ["x_T", "h"]}).model_dump()
                     | {"checkpoint_fid": {"every": 1, "num_samples": 8, "ddim_steps": 2}})
    reporter = LocalReporter(tmp_path / "run")
    res = train_loop(spec, reporter, evaluator=trial_evaluator(spec), scorer=checkpoint_fid_scorer(spec))
    metrics = res.eval.metrics
    assert all(np.isfinite(metrics[k]) for k in ("fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_h")), metrics
    assert np.isfinite(res.metrics["selected_fid_cheap"]) and res.metrics["selected_step"] in (1, 2)
    assert res.eval.settings["autoencoder"] == "VQModel" and res.eval.settings["sample_shape"] == [4, 8, 8]
    grid = res.eval.images["samples"]
    assert (grid.shape[0] - 2) % (16 + 2) == 0 and (grid.shape[1] - 2) % (16 + 2) == 0  # tiles of 16 px decoded images
    assert (reporter.checkpoints[-1] / "vqvae" / "config.json").is_file()


def test_the_tangent_through_a_vq_decoder_passes_the_quantiser_straight(tiny_ldm_dir):
    """The codebook lookup has no forward-mode rule: the decoded tangent is the decoder's derivative at the quantised
    latents, along the unquantised direction (the quantiser's straight-through estimator), and the images are the
    ordinary decoding."""
    codec = load_base(BaseModelSpec(source=str(tiny_ldm_dir))).codec
    s = codec.scaling_factor
    z, v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 8, 8)
    with autodiff_safe(codec.module):  # attention on the math backend, as `ddim_tangent` runs the decoder
        images, tangent = torch.func.jvp(lambda x: codec.decode(x, straight_through=True), (z,), (v,))
        quantised = codec.module.quantize(z / s)[0] * s
        _, want = torch.func.jvp(lambda x: codec.module.decode(x / s, force_not_quantize=True).sample.clamp(-1, 1),
                                 (quantised,), (v,))
    torch.testing.assert_close(images, codec.decode(z))
    # up to float rounding: the decoder's input is z + (z_q - z) there, z_q here
    torch.testing.assert_close(tangent, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert tangent.abs().max() > 0


def test_sample_and_interpolate_commands_decode_a_latent_model(tiny_ldm_dir, tmp_path, capsys):
    """`isosweep sample` and `interpolate` on an LDMPipeline folder write 16 px decoded images (the latents are 8x8);
    `isosweep invert`, pixel-space only, refuses it with a line that names the model (bad input)."""
    from PIL import Image

    from isosweep.cli import main
    from isosweep.constants import EXIT_COMPLETED

    assert main(["sample", str(tiny_ldm_dir), "--n", "4", "--steps", "2", "--out", str(tmp_path / "grid.png")]) == EXIT_COMPLETED
    assert Image.open(tmp_path / "grid.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # make_grid: 2x2 tiles of 16 px, pad 2
    assert main(["interpolate", str(tiny_ldm_dir), "--frames", "3", "--steps", "2", "--out", str(tmp_path / "strip.png")]) == 0
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape[0] in (16, 16 + 2 * 2)  # one row of 16 px frames
    distances = json.loads((tmp_path / "strip_distances.json").read_text())["values"]
    assert len(distances) == 2 and all(np.isfinite(distances))
    base = load_base(BaseModelSpec(source=str(tiny_ldm_dir)))
    from isosweep.commands.models import interpolation_frames

    frames = interpolation_frames(base.unet, base.scheduler, [0, 1], 3, "slerp", 2, base.codec)
    latents = interpolation_frames(base.unet, base.scheduler, [0, 1], 3, "slerp", 2)
    assert frames.shape == (3, 3, 16, 16) and latents.shape == (3, 4, 8, 8)
    np.testing.assert_array_equal(frames, base.codec.decode(torch.from_numpy(latents)).numpy())
    capsys.readouterr()
    assert main(["pull", str(tiny_ldm_dir), "--out", str(tmp_path / "pulled")]) == EXIT_COMPLETED
    out = capsys.readouterr().out
    assert "LDMPipeline.from_pretrained loads it" in out and "4x8x8 latents" in out
    assert list((tmp_path / "pulled").rglob("vqvae/config.json"))
    # invert works on pixel-space models only: refused as bad input, one line naming the model
    from isosweep.constants import EXIT_SPEC_ERROR

    assert main(["invert", str(tiny_ldm_dir), str(tmp_path / "grid.png"), "--steps", "2", "--out", str(tmp_path / "inv")]) == EXIT_SPEC_ERROR
    assert not (tmp_path / "inv").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a latent diffusion model (VQModel autoencoder)" in err[0] and "fix:" in err[0]


def test_a_latent_model_is_not_staged_for_serving(tiny_ldm_dir, tiny_model_dir, tmp_path):
    """The served model's DDIM has no decoder: registering a latent model is refused before anything is logged."""
    from isosweep.tracking.registry import _stage_pipeline

    with pytest.raises(ValueError, match="latent diffusion model .* not registered"):
        _stage_pipeline(tiny_ldm_dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert (_stage_pipeline(tiny_model_dir, tmp_path / "b") / "model_index.json").is_file()


def test_an_ldm_hub_id_loads_from_the_offline_cache(tiny_ldm_dir, tmp_path, monkeypatch):
    """`base_model.source: CompVis/ldm-celebahq-256` from a Hugging Face cache entry in its layout (offline): the UNet
    from unet/, the codec from vqvae/, as from the folder."""
    import huggingface_hub.constants as hf_constants
    from support.hub import LDM_CELEBAHQ, LDM_CELEBAHQ_COMMIT, write_pipeline_repo

    write_pipeline_repo(tmp_path, LDM_CELEBAHQ, LDM_CELEBAHQ_COMMIT, tiny_ldm_dir)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    hub, local = load_base(BaseModelSpec(source=LDM_CELEBAHQ)), load_base(BaseModelSpec(source=str(tiny_ldm_dir)))
    assert isinstance(hub.codec.module, VQModel)
    for a, b in ((hub.unet, local.unet), (hub.codec.module, local.codec.module)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert hub.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(LatentModelError):
        load_unet_and_scheduler(BaseModelSpec(source=LDM_CELEBAHQ))


def test_the_eval_command_evaluates_a_latent_model(tiny_ldm_dir, tmp_path, capsys, fast_domain):
    """`isosweep eval` on an LDMPipeline folder: FID on decoded 16 px images, MCN on the latent UNet."""
    import yaml

    from isosweep.cli import main

    spec = {"name": "ldm", "base_model": {"source": str(tiny_ldm_dir)}, "dataset": {"kind": "shapes", "size": 32, "resolution": 16},
            "evaluation": eval_spec(tmp_path).model_dump()}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["eval", str(tiny_ldm_dir), "--spec", str(tmp_path / "spec.yaml"), "--metrics", "fid", "mcn"]) == 0
    row = capsys.readouterr().out
    assert "fid" in row.lower() and "mcn" in row.lower()
