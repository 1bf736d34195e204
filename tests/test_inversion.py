"""DDIM inversion: the known answer (an image DDIM drew from x_T inverts back to x_T, and redraws as itself) and
`isosweep invert` end to end on a saved model folder, its bad input included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

from isosweep.cli import main
from isosweep.core.inversion import ddim_invert, predicted_epsilon
from isosweep.core.sampling import ddim_sample
from isosweep.data.datasets import ImageFolderDataset
from isosweep.models.builtin import default_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def _unet(dtype: torch.dtype) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    return unet.to(dtype).eval()


def _scheduler(prediction_type: str = "epsilon", **config) -> DDPMScheduler:
    """isosweep's DDPM schedule without the x_0 clip: with it, the sampler maps many x_t to one image and nothing inverts."""
    base = {k: v for k, v in default_scheduler().config.items() if not k.startswith("_")}
    return DDPMScheduler(**{**base, "prediction_type": prediction_type, "clip_sample": False, **config})


@torch.no_grad()
def _drawn(unet, scheduler, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0), unclamped and in x_T's dtype: the reference the inversion must undo."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x = x_T
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("dtype, refine, tolerance, spacing, steps", [
    (torch.float64, 30, 1e-12, "leading", STEPS),
    (torch.float32, 10, 1e-5, "leading", STEPS),
    (torch.float64, 30, 1e-12, "trailing", 7),  # 1000 / 7 is no integer: diffusers' steps land between its timesteps
])
def test_inverting_a_drawn_image_gives_back_its_x_T(dtype, refine, tolerance, spacing, steps):
    """Measured: float64 |x_T' - x_T| <= 1.8e-15 after 30 refinements (x_T up to 3.7), float32 1.6e-6 after 10; the
    redraw of x_T' matches the image as closely (relative to its size: a random UNet draws pixels in the hundreds)."""
    unet, scheduler = _unet(dtype), _scheduler(timestep_spacing=spacing)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    image = _drawn(unet, scheduler, x_T, steps)
    inverted = ddim_invert(unet, scheduler, image, steps, refine=refine, progress=False, batch_size=1)
    assert inverted.dtype == dtype
    assert (inverted - x_T).abs().max() < tolerance
    assert ((_drawn(unet, scheduler, inverted, steps) - image).abs().max() / image.abs().max()) < tolerance
    # isosweep's sampler draws the same image from it (in float32, clamped to [-1, 1] as it returns images)
    redrawn = ddim_sample(unet, scheduler, inverted, steps, progress=False).images
    assert (redrawn - image.clamp(-1, 1).float()).abs().max() < 1e-4


def test_plain_inversion_is_diffusers_ddim_inverse_scheduler_and_only_approximate():
    """refine=0 is plain DDIM inversion: for an epsilon model, step for step diffusers' DDIMInverseScheduler (equal to
    the last bit in float64). It evaluates the model at the lower point of each step, so it misses x_T (by 0.53)."""
    unet, scheduler = _unet(torch.float64), _scheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    image = _drawn(unet, scheduler, x_T, STEPS)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(STEPS)
    x = image
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t).sample, t, x).prev_sample
    plain = ddim_invert(unet, scheduler, image, STEPS, progress=False)
    assert (plain - x).abs().max() < 1e-12
    assert (plain - x_T).abs().max() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predicted_epsilon_reads_the_output_as_the_sampler_does(prediction_type):
    """The epsilon of an output is the one DDIMScheduler's step implies: x = sqrt(a) x_0 + sqrt(1 - a) eps."""
    ddim = DDIMScheduler.from_config(_scheduler(prediction_type).config)
    ddim.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(2)
    x, output = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for t in (int(ddim.timesteps[0]), int(ddim.timesteps[-1])):
        a = ddim.alphas_cumprod[t]  # float32, as the step reads it (its square roots rounded as there)
        x0 = ddim.step(output, t, x).pred_original_sample
        eps = predicted_epsilon(output, x, a, prediction_type)
        assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, atol=1e-10)


def test_a_schedule_the_inverse_scheduler_cannot_walk_is_refused():
    scheduler = _scheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="timestep_spacing 'leading' or 'trailing'"):
        ddim_invert(_unet(torch.float32), scheduler, torch.zeros(1, 3, 8, 8), STEPS, progress=False)


# `isosweep invert` end to end


def _invert(model, *rest) -> list[str]:
    return ["invert", str(model), *map(str, rest), "--spec", str(ROOT / "search_spaces" / "demo.yaml"), "--device", "cpu"]


def test_invert_command_writes_x_T_reconstructions_and_errors(tiny_model_dir, image_files, fast_domain, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_invert(tiny_model_dir, *image_files, "--steps", 4, "--refine", 1, "--out", out, "--batch-size", 1)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("inverted 2 image(s) with DDIM 4 steps") and "\n" not in line, line
    x_T = np.load(out / "x_T.npy", allow_pickle=False)
    assert x_T.shape == (2, 3, 8, 8) and x_T.dtype == np.float32 and np.isfinite(x_T).all()
    report = json.loads((out / "inversion.json").read_text())
    for key in ("mse", "mse_lo", "mse_hi", "perceptual", "perceptual_lo", "perceptual_hi"):
        assert np.isfinite(report[key]), key
    assert report["mse_lo"] <= report["mse"] <= report["mse_hi"]
    assert report["perceptual_distance"] == "domain-shapes-v1" and report["steps"] == 4 and report["refine"] == 1
    assert [Path(i["file"]).name for i in report["images"]] == ["a.png", "b.png"]
    for entry in report["images"]:
        assert Image.open(out / entry["reconstruction"]).size == (8, 8)
    # the numbers are the saved x_T's: redrawn from x_T.npy, the images lie that far from the inputs as an image folder
    # loads them for training
    from isosweep.models.loading import load_local

    unet, scheduler = load_local(tiny_model_dir, None)
    redrawn = ddim_sample(unet, scheduler, torch.from_numpy(x_T), 4, progress=False).images.double()
    inputs = torch.stack([item[0] for item in ImageFolderDataset(image_files[0].parent, 8, random_flip=False)]).double()
    mse = ((redrawn - inputs) ** 2).flatten(1).mean(1)
    assert np.allclose(mse.numpy(), [i["mse"] for i in report["images"]], rtol=1e-4)
    assert np.isclose(report["mse"], float(mse.mean()), rtol=1e-4)
    # round_trip.png: the inputs (top row) over their reconstructions (bottom row), 8 px tiles
    strip = np.asarray(Image.open(out / report["round_trip"])).astype(np.float64)
    assert strip.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    for row, tiles in enumerate((inputs, redrawn)):
        for c, tile in enumerate(((tiles.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()):
            assert np.abs(strip[2 + 10 * row: 10 + 10 * row, 2 + 10 * c: 10 + 10 * c] - tile).max() <= 1


def test_invert_command_refuses_bad_input_with_one_line(tiny_model_dir, image_files, fast_domain, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    new = tmp_path / "new"
    cases = {
        "cannot be read as an image": [image_files[0], broken, "--out", new],
        "no images given": ["--out", new],
        "no such file or folder": [tmp_path / "missing.png", "--out", new],
        "--steps and --batch-size must be at least 1": [*image_files, "--steps", 0, "--out", new],
        "exists and is not an empty folder": [*image_files, "--out", full],
    }
    for message, rest in cases.items():
        assert main(_invert(tiny_model_dir, *rest)) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("error: ") and "\n" not in err, err
        assert not new.exists() and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "cache").exists()  # refused before any network was loaded or trained


def test_the_inversion_metric_in_the_suite_is_ddim_invert_and_the_distance_on_the_datasets_images(fast_domain, tmp_path):
    """evaluation.metrics may name inversion_mse and inversion_perceptual: the suite inverts the dataset's first
    evaluation.inversion.num_images images and draws them again, as `isosweep invert` does; two ranks' shares give
    the one-process numbers; asking for one of the two records only it."""
    from isosweep.core.sampling import DDIMSampler
    from isosweep.data.datasets import build_dataset
    from isosweep.evaluation.features.resolver import load_feature_networks
    from isosweep.evaluation.record import EvalResult
    from isosweep.evaluation.suite import evaluate_model
    from isosweep.evaluation.suite_metrics import REGISTRY, Shard
    from isosweep.spec import DatasetSpec, EvaluationSpec

    inversion = {"num_images": 5, "ddim_steps": 4, "refine": 1, "shown": 3}
    ev = EvaluationSpec(metrics=["inversion_mse", "inversion_perceptual"], backbone="domain", cache_dir=str(tmp_path / "eval"),
                        batch_size=2, seed=3, inversion=inversion, bootstrap={"resamples": 50})
    data = DatasetSpec(kind="shapes", resolution=8, size=64)
    unet, scheduler = _unet(torch.float32), _scheduler()
    result = evaluate_model(unet, scheduler, ev, data, device="cpu", progress=False, images=False)
    # by hand: the same images, inversion, redraw and distance
    images = torch.stack([build_dataset(data, train=False)[i][0] for i in range(5)])
    redrawn = ddim_sample(unet, scheduler, ddim_invert(unet, scheduler, images, 4, refine=1, progress=False), 4,
                          progress=False).images
    nets = load_feature_networks(ev, data, needs=("ppl",), device="cpu")
    mse = ((redrawn.double() - images.double()) ** 2).flatten(1).mean(dim=1).numpy()
    perceptual = nets.distance(images, redrawn).double().numpy()
    assert result.values["inversion_mse_samples"] == pytest.approx(mse, rel=1e-5, abs=1e-9)
    assert result.values["inversion_perceptual_samples"] == pytest.approx(perceptual, rel=1e-4, abs=1e-7)
    for name, values in (("inversion_mse", mse), ("inversion_perceptual", perceptual)):
        assert result.metrics[name] == pytest.approx(values.mean(), rel=1e-4)
        assert result.metrics[f"{name}_lo"] <= result.metrics[name] <= result.metrics[f"{name}_hi"], name
    assert result.backbones["inversion_perceptual"] == "domain-shapes-v1" and result.backbones["inversion_mse"] == "none"
    assert result.settings["inversion"] == inversion
    # the strip: the first 3 images over their redraws, 8 px tiles
    strip = result.images["inversion_strip"].astype(np.float64)
    assert strip.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    for row, tiles in enumerate((images[:3], redrawn[:3])):
        for c, tile in enumerate(((tiles.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()):
            assert np.abs(strip[2 + 10 * row: 10 + 10 * row, 2 + 10 * c: 10 + 10 * c] - tile).max() <= 1
    # two ranks (3 + 2 images, the strip's across both) combine to the same numbers and strip
    metric, sampler = REGISTRY["inversion_mse"], DDIMSampler(unet, scheduler, batch_size=2, progress=False, device="cpu")
    shards = [Shard(sampler, unet, scheduler, ev, data, torch.device("cpu"), rank, 2, False, metrics=tuple(ev.metrics))
              for rank in range(2)]
    shares = [metric.share(s, nets) for s in shards]
    assert [len(g["mse"]) for g in shares] == [3, 2]
    two = EvalResult()
    metric.combine(two, shares, shards[0], nets)
    assert two.values["inversion_mse_samples"] == pytest.approx(result.values["inversion_mse_samples"], rel=1e-6)
    assert np.abs(two.images["inversion_strip"].astype(int) - result.images["inversion_strip"]).max() <= 1
    only = evaluate_model(unet, scheduler, ev, data, metrics=["inversion_mse"], device="cpu", progress=False, images=False)
    assert "inversion_perceptual" not in only.metrics and only.metrics["inversion_mse"] == pytest.approx(result.metrics["inversion_mse"])
    with pytest.raises(ValueError, match=r"field 'evaluation.inversion.num_images': 5 is more than the dataset's 4 images"):
        evaluate_model(unet, scheduler, ev, DatasetSpec(kind="shapes", resolution=8, size=4), device="cpu", progress=False)


def test_the_report_shows_the_baseline_and_champion_inversion_round_trips(tmp_path):
    from isosweep.evaluation.record import EvalResult
    from isosweep.results.pareto import Choice
    from isosweep.results.report import write_report
    from isosweep.results.rows import SweepOutcome, make_row
    from isosweep.spec import load_spec

    spec = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    settings = {"inversion": {**spec.evaluation.inversion.model_dump(), "ddim_steps": 7, "num_images": 6}}
    rows = []
    for i, (name, cfg) in enumerate((("base0001", {"baseline": True, "lambda_iso": 0.0, "p": 1.0}),
                                     ("iso00002", {"lambda_iso": 0.2, "p": 0.5}))):
        strip = np.full((22, 42, 3), 40 * (i + 1), np.uint8)
        EvalResult(metrics={"fid": 10.0 - i, "ppl": 5.0}, images={"inversion_strip": strip}, settings=settings).write(tmp_path / name)
        row = make_row(name, {"iso_metric": "stereographic", **cfg}, {"fid": 10.0 - i, "ppl": 5.0, "evaluated": True},
                       "TERMINATED")
        rows.append({**row, "checkpoint_path": str(tmp_path / name)})
    outcome = SweepOutcome("demo-x", tmp_path, rows, rows, Choice(rows[1], "test"))
    report = write_report(spec, outcome, tmp_path / "report")
    text = (report / "report.md").read_text()
    assert "## DDIM inversion" in text and "### Round trips: champion (7 DDIM steps, refine 0, 6 images measured)" in text
    for label, value in (("baseline", 40), ("champion", 80)):
        assert f"![inversion {label}](inversion_{label}.png)" in text
        assert (np.asarray(Image.open(report / f"inversion_{label}.png")) == value).all()
    assert '<img src="inversion_champion.png"' in (report / "report.html").read_text()
