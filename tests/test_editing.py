"""Local Basis editing: the known answers (a linear encoder's basis is its right singular vectors, and an edit moves h
along one left singular vector only; a UNet's basis is the SVD of its explicit Jacobian), the DDIM schedule split
at the edit, the linearity and consistency numbers, and `isosweep edit` end to end with its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from isosweep.cli import main
from isosweep.commands.models import seed_noise
from isosweep.core.editing import ddim_steps, edit_step_index, edited_states, local_basis, unet_local_basis
from isosweep.core.hspace import autodiff_safe, encode
from isosweep.core.sampling import ddim_sample, ddim_scheduler
from isosweep.evaluation.metrics.editing import (agreement_per_sample, chance_agreement, linearity_r2, straightness,
                                                 subspace_agreement)
from isosweep.models.builtin import default_scheduler
from isosweep.models.loading import load_local

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| between matching rows of two (k, ...) sets of unit vectors."""
    return (a.reshape(len(a), -1).double() * b.reshape(len(b), -1).double()).sum(dim=1).abs()


def test_a_linear_encoders_local_basis_is_its_right_singular_vectors_and_edits_move_h_along_one_axis():
    torch.manual_seed(0)
    a = torch.randn(6, 12, dtype=torch.float64)
    encoder = lambda x: x.reshape(x.shape[0], -1) @ a.T  # noqa: E731
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    basis = local_basis(encoder, x, 4)
    u, s, vh = torch.linalg.svd(a)
    assert torch.allclose(basis.singular_values, s[:4], rtol=1e-12)
    assert torch.allclose(_aligned(basis.directions, vh[:4]), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert basis.residuals.max() < 1e-12
    gram = basis.directions.reshape(4, -1) @ basis.directions.reshape(4, -1).T
    assert torch.allclose(gram, torch.eye(4, dtype=torch.float64), atol=1e-12)
    for i in range(4):  # h(x + g v_i) - h(x) = g sigma_i u_i (up to the sign the basis chose)
        moved = encoder(x + 2.5 * basis.directions[i]) - encoder(x)
        assert torch.allclose(moved.abs()[0], (2.5 * s[i] * u[:, i]).abs(), atol=1e-12)
        assert torch.allclose(_aligned(moved, u[:, i].unsqueeze(0)), 2.5 * s[i].reshape(1), rtol=1e-12)


def test_the_products_keep_no_graph_for_weights_that_require_grad():
    """A product that kept the autograd graph of trainable weights held every activation of every pass: 19 GiB for
    one vector at 128 px before this was fixed, 0.3 GiB after (bench/editing.py)."""
    from isosweep.core.editing import _Gram

    weight = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    gram = _Gram(lambda x: x.reshape(x.shape[0], -1) @ weight.T, torch.randn(1, 12, dtype=torch.float64), 2, keep=False)
    vectors = torch.randn(3, 12, dtype=torch.float64)
    with torch.enable_grad():
        assert gram.j(vectors).grad_fn is None and gram.jtj(vectors).grad_fn is None
    unet = _unet()
    unet_local_basis(unet, torch.randn(1, 3, 8, 8, dtype=torch.float64), 500, 2, iterations=1)
    assert all(p.requires_grad for p in unet.parameters())  # the weights are handed back trainable


def _unet(dtype=torch.float64) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8).to(dtype).eval()


def test_a_unets_local_basis_is_the_svd_of_its_explicit_jacobian():
    """Measured: 30 rounds give singular values to 1e-12 relative and residuals <= 1e-8 (float64); 0 rounds do not."""
    unet = _unet()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with autodiff_safe(unet):
        jac = torch.autograd.functional.jacobian(lambda z: encode(unet, z, torch.tensor(500)).reshape(-1), x)
    _, s, vh = torch.linalg.svd(jac.reshape(-1, x.numel()))
    basis = unet_local_basis(unet, x, 500, 3, iterations=30)
    assert torch.allclose(basis.singular_values, s[:3], rtol=1e-10)
    assert torch.allclose(_aligned(basis.directions, vh[:3]), torch.ones(3, dtype=torch.float64), atol=1e-8)
    assert basis.residuals.max() < 1e-6
    passes = unet_local_basis(unet, x, 500, 3, iterations=30, vectors_per_pass=2)  # 7 vectors in passes of 2, 2, 2, 1
    assert torch.allclose(passes.directions, basis.directions, atol=1e-12)
    assert torch.allclose(passes.singular_values, basis.singular_values, rtol=1e-12)
    rough = unet_local_basis(unet, x, 500, 3, iterations=1)
    assert rough.residuals.max() > 1e-3  # the residuals tell a user too few rounds were run
    assert unet.training is False and torch.equal(unet_local_basis(unet, x, 500, 3, iterations=30).directions,
                                                  basis.directions)  # reproducible: signs fixed, seeded start


def test_the_schedule_split_at_the_edit_draws_what_the_sampler_draws():
    unet, scheduler = _unet(torch.float32), default_scheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ddim = ddim_scheduler(scheduler, 10)
    steps = [int(t) for t in ddim.timesteps]
    at = edit_step_index(steps, 450)
    assert steps[at] <= 450 < steps[at - 1] and edit_step_index(steps, 5000) == 0
    assert edit_step_index([900, 500, 100], 500) == 1 and edit_step_index([900, 500, 100], 499) == 2
    with pytest.raises(ValueError, match="below the last DDIM timestep"):
        edit_step_index([900, 500, 100], 50)
    split = ddim_steps(unet, ddim, ddim_steps(unet, ddim, x_T, steps[:at]), steps[at:]).clamp(-1, 1)
    whole = ddim_sample(unet, scheduler, x_T, 10, progress=False).images
    assert torch.allclose(split, whole, atol=1e-6)
    rows = torch.eye(3 * 8 * 8)[:2].reshape(2, 1, 3, 8, 8)
    edited = edited_states(x_T[:1], rows[:, 0], torch.tensor([-1.0, 0.0, 2.0]))
    assert edited.shape == (6, 3, 8, 8) and torch.equal(edited[1], x_T[0]) and torch.equal(edited[4], x_T[0])
    assert torch.allclose(edited[5] - x_T[0], 2.0 * rows[1, 0]) and torch.allclose(edited[0] - x_T[0], -rows[0, 0])


def test_linearity_straightness_and_agreement_know_their_answers():
    gammas = np.linspace(-3, 3, 7)
    assert linearity_r2(gammas, 0.4 * np.abs(gammas)) == pytest.approx(1.0)
    saturating = np.tanh(3 * np.abs(gammas))
    assert linearity_r2(gammas, saturating) < 0.8
    assert np.isnan(linearity_r2(gammas, np.zeros(7)))
    assert linearity_r2(gammas, 1 + 0.1 * np.abs(gammas)) < 0.8  # a jump at the first step, linear after it
    assert straightness(np.full(6, 0.5), 3.0) == pytest.approx(1.0) and straightness(np.full(6, 1.0), 3.0) == 0.5
    rng = np.random.default_rng(0)
    q = torch.from_numpy(np.linalg.qr(rng.standard_normal((50, 50)))[0])
    a, rotated = q[:3], torch.from_numpy(np.linalg.qr(rng.standard_normal((3, 3)))[0]) @ q[:3]
    assert subspace_agreement(a, rotated) == pytest.approx(1.0) and subspace_agreement(a, q[3:6]) == pytest.approx(0.0, abs=1e-12)
    draws = [subspace_agreement(*(torch.from_numpy(np.linalg.qr(rng.standard_normal((50, 3)))[0].T) for _ in range(2)))
             for _ in range(400)]
    assert np.mean(draws) == pytest.approx(chance_agreement(3, 50), rel=0.1)
    per = agreement_per_sample([a, rotated, q[3:6]])
    assert per == pytest.approx([0.5, 0.5, 0.0])


def _edit(model, *rest) -> list[str]:
    return ["edit", str(model), *map(str, rest), "--spec", str(ROOT / "search_spaces" / "demo.yaml"), "--device", "cpu"]


def test_edit_command_writes_grids_bases_and_numbers(tiny_model_dir, fast_domain, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--seed", 3, 4, "--t", 500, "--gamma", 6, "--columns", 5, "--directions", 0, 2, "--combine", 0, 1,
            "--steps", 6, "--iterations", 4, "--batch-size", 4, "--vectors-per-pass", 3, "--out", out]
    assert main(_edit(tiny_model_dir, *args)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("edited 2 sample(s) along 3 direction(s) at t=") and "\n" not in line, line
    report = json.loads((out / "edit.json").read_text())  # strict JSON: no NaN
    assert report["gammas"] == [-6.0, -3.0, 0.0, 3.0, 6.0] and report["basis_size"] == 3
    assert report["distance"] == "sqrt(domain-shapes-v1)" and report["chance_consistency"] == 3 / 192
    for key in ("linearity_r2", "straightness", "consistency"):
        assert report[f"{key}_lo"] <= report[key] <= report[f"{key}_hi"], key
    unet, scheduler = load_local(tiny_model_dir, None)
    for sample, seed in zip(report["samples"], (3, 4)):
        assert sample["name"] == f"seed_{seed}" and [r["direction"] for r in sample["rows"]] == ["0", "2", "0+1"]
        assert all(0 < r["straightness"] <= 1 + 1e-9 and r["distances"][2] == 0 for r in sample["rows"])
        basis = np.load(out / sample["basis"], allow_pickle=False)
        assert basis.shape == (3, 3, 8, 8) and np.allclose(basis.reshape(3, -1) @ basis.reshape(3, -1).T, np.eye(3), atol=1e-5)
        grid = np.asarray(Image.open(out / sample["grid"]))
        # the gamma = 0 column is `isosweep sample --n 1 --seed S`'s image (2 px padding around 8 px tiles)
        drawn = ddim_sample(unet, scheduler, seed_noise(seed, (3, 8, 8)), 6, progress=False).images[0]
        expected = np.round((drawn.permute(1, 2, 0).numpy() + 1) * 127.5)
        tile = grid[2:10, 2 + 2 * 10: 10 + 2 * 10].astype(np.float64)
        assert grid.shape == (3 * 10 + 2, 5 * 10 + 2, 3) and np.abs(tile - expected).max() <= 1
    # the edits are along the saved directions: the top row's right end is x_t + 6 v_0 drawn on from the edit step
    ddim = ddim_scheduler(scheduler, 6)
    steps = [int(t) for t in ddim.timesteps]
    at = edit_step_index(steps, 500)
    x_t = ddim_steps(unet, ddim, seed_noise(3, (3, 8, 8)), steps[:at])
    v0 = torch.from_numpy(np.load(out / report["samples"][0]["basis"], allow_pickle=False)[0])
    end = ddim_steps(unet, ddim, x_t + 6 * v0, steps[at:]).clamp(-1, 1)[0]
    tile = np.asarray(Image.open(out / report["samples"][0]["grid"]))[2:10, 2 + 4 * 10: 10 + 4 * 10].astype(np.float64)
    assert np.abs(tile - np.round((end.permute(1, 2, 0).numpy() + 1) * 127.5)).max() <= 1


def test_edit_command_edits_a_users_image_through_inversion(tiny_model_dir, image_files, fast_domain, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_edit(tiny_model_dir, "--image", *image_files, "--t", 300, "--gamma=-2..4", "--columns", 3,
                      "--directions", 1, "--steps", 4, "--iterations", 2, "--out", out)) == 0
    report = json.loads((out / "edit.json").read_text())
    assert [s["name"] for s in report["samples"]] == ["0000_a", "0001_b"] and report["gammas"] == [-2.0, 1.0, 4.0]
    assert all((out / s["grid"]).exists() and (out / s["basis"]).exists() for s in report["samples"])


def test_edit_command_refuses_bad_input_with_one_line(tiny_model_dir, image_files, fast_domain, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    new = tmp_path / "new"
    base = ["--t", 500, "--gamma", 3]
    cases = {
        "the range is empty": ["--t", 500, "--gamma", 0, "--out", new],
        "not G or LO..HI": ["--t", 500, "--gamma", "a..b", "--out", new],
        "--combine takes two directions": [*base, "--combine", 1, "--out", new],
        "indices 0, 1, 2": [*base, "--directions", -1, "--out", new],
        "--columns must be at least 2": [*base, "--columns", 1, "--out", new],
        "--iterations must be at least 1": [*base, "--iterations", 0, "--out", new],
        "--vectors-per-pass must be at least 1": [*base, "--vectors-per-pass", 0, "--out", new],
        "not both": [*base, "--seed", 1, "--image", *image_files, "--out", new],
        "exists and is not an empty folder": [*base, "--out", full],
        "the model's X has 192 dimensions": [*base, "--directions", 192, "--out", new],
    }
    for message, rest in cases.items():
        assert main(_edit(tiny_model_dir, *rest)) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("error: ") and "\n" not in err, err
        assert not new.exists() and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "cache").exists()  # refused before any network was loaded or trained


def test_the_edit_metric_in_the_suite_records_what_isosweep_edit_measures(fast_domain, tmp_path):
    """evaluation.metrics may name edit_linearity, edit_straightness, edit_consistency: the suite edits
    evaluation.edit.num_samples latents (stream 8 of evaluation.seed) as `isosweep edit` does."""
    from diffusers import DDIMScheduler

    from isosweep.core.sampling import initial_noise
    from isosweep.evaluation.features.resolver import load_feature_networks
    from isosweep.evaluation.metrics.editing import edit_sample
    from isosweep.evaluation.suite import evaluate_model
    from isosweep.spec import DatasetSpec, EvaluationSpec

    edit = {"num_samples": 3, "t": 500, "gamma": 4.0, "columns": 3, "directions": 2, "iterations": 3, "ddim_steps": 4}
    ev = EvaluationSpec(metrics=["edit_linearity", "edit_straightness", "edit_consistency"], backbone="domain",
                        cache_dir=str(tmp_path / "eval"), batch_size=8, seed=3, edit=edit, bootstrap={"resamples": 50})
    data = DatasetSpec(kind="shapes", resolution=8)
    unet, scheduler = _unet(torch.float32), DDIMScheduler(num_train_timesteps=1000)
    result = evaluate_model(unet, scheduler, ev, data, device="cpu", progress=False, images=False)
    for name in ("edit_linearity", "edit_straightness", "edit_consistency"):
        assert result.metrics[f"{name}_lo"] <= result.metrics[name] <= result.metrics[f"{name}_hi"], name
        assert result.values[f"{name}_samples"].shape == (3,)
    assert result.metrics["edit_chance_consistency"] == 2 / 192 and result.settings["edit"] == edit
    assert result.backbones["edit_linearity"] == "domain-shapes-v1" and result.backbones["edit_consistency"] == "none"
    assert result.images["edit_grid"].shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # sample 0: 2 directions x 3 gammas, 8 px tiles
    # sample 1 by hand: the same latent, schedule and distance give the same numbers
    ddim = ddim_scheduler(scheduler, 4)
    steps = [int(t) for t in ddim.timesteps]
    nets = load_feature_networks(ev, data, needs=("ppl",), device="cpu")
    x_T = initial_noise(3, (3, 8, 8), 3, stream=8)[1:2]
    one = edit_sample(unet, ddim, steps, edit_step_index(steps, 500), x_T, 2, [0, 1], np.linspace(-4, 4, 3),
                      nets.distance, iterations=3)
    assert result.values["edit_linearity_samples"][1] == pytest.approx(np.nanmean([r["linearity_r2"] for r in one.rows]))
    assert result.values["edit_straightness_samples"][1] == pytest.approx(np.nanmean([r["straightness"] for r in one.rows]))
    first = edit_sample(unet, ddim, steps, edit_step_index(steps, 500), initial_noise(1, (3, 8, 8), 3, stream=8), 2,
                        [0, 1], np.linspace(-4, 4, 3), nets.distance, iterations=3)
    tiles = ((first.grid.reshape(6, 3, 8, 8).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    shown = result.images["edit_grid"].astype(np.float64)
    for i in range(6):
        r, c = divmod(i, 3)
        assert np.abs(shown[2 + 10 * r: 10 + 10 * r, 2 + 10 * c: 10 + 10 * c] - tiles[i]).max() <= 1
    only = evaluate_model(unet, scheduler, ev, data, metrics=["edit_consistency"], device="cpu", progress=False, images=False)
    assert "edit_linearity" not in only.metrics and only.metrics["edit_consistency"] == pytest.approx(result.metrics["edit_consistency"])


def test_the_report_shows_the_baseline_and_champion_edit_grids(tmp_path):
    from isosweep.evaluation.record import EvalResult
    from isosweep.results.report import write_report
    from isosweep.results.rows import SweepOutcome, make_row
    from isosweep.results.pareto import Choice
    from isosweep.spec import load_spec

    spec = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    rows = []
    for i, (name, cfg) in enumerate((("base0001", {"baseline": True, "lambda_iso": 0.0, "p": 1.0}),
                                     ("iso00002", {"lambda_iso": 0.2, "p": 0.5}))):
        grid = np.full((22, 32, 3), 40 * (i + 1), np.uint8)
        EvalResult(metrics={"fid": 10.0 - i, "ppl": 5.0}, images={"edit_grid": grid},
                   settings={"edit": spec.evaluation.edit.model_dump()}).write(tmp_path / name)
        row = make_row(name, {"iso_metric": "stereographic", **cfg}, {"fid": 10.0 - i, "ppl": 5.0, "evaluated": True},
                       "TERMINATED")
        rows.append({**row, "checkpoint_path": str(tmp_path / name)})
    outcome = SweepOutcome("demo-x", tmp_path, rows, rows, Choice(rows[1], "test"))
    report = write_report(spec, outcome, tmp_path / "report")
    text = (report / "report.md").read_text()
    assert "## Local Basis edits (Fig. 7)" in text and "### Edits: champion (t = 500, gamma -6.0..6.0, 2 directions)" in text
    for label, value in (("baseline", 40), ("champion", 80)):
        assert f"![edits {label}](edits_{label}.png)" in text
        assert (np.asarray(Image.open(report / f"edits_{label}.png")) == value).all()
