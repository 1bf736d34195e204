"""The served model's edit and invert modes and its answers to several rows, against isosweep's own functions.

The model is saved as the registry logs it (`registry.save_served_model`, the tiny 8x8 pipeline) and asked through
`mlflow.pyfunc.load_model(...).predict`; `tests/test_serving.py` posts its logged input example over HTTP.
Known answers: an edit at gamma 0 is the sample of its seed; an edit at gamma g is `isosweep edit`'s grid
(`evaluation.metrics.editing.edit_sample`) for the same seed, t and steps; an inversion is `core.inversion.ddim_invert`
of the PNG's pixels and its reconstruction `core.sampling.ddim_sample` of that x_T.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from isosweep.core.inversion import ddim_invert
from isosweep.core.sampling import ddim_sample, ddim_scheduler, sample_shape
from isosweep.data.images import to_uint8
from isosweep.evaluation.metrics.editing import edit_sample
from isosweep.models.loading import load_local
from isosweep.tracking import registry

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("served") / "model"
    registry.save_served_model(path, tiny_model_dir)
    return path


@pytest.fixture
def model(saved, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    return mlflow.pyfunc.load_model(str(saved))


def _pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (8, 8)
    return np.asarray(img).astype(int)


def test_an_edit_at_gamma_zero_is_the_sample_and_at_gamma_g_is_isosweep_edits(model, tiny_model_dir):
    seed, t, gammas, directions = 5, 500, [-6.0, 0.0, 6.0], [0, 2]
    answer = model.predict({"mode": "edit", "seed": seed, "steps": STEPS, "t": t, "directions": directions, "gammas": gammas,
                            "iterations": 4})
    edited = np.stack([_pixels(p) for p in answer["images"]]).reshape(2, 3, 8, 8, 3)  # rows: directions, columns: gammas
    sample = _pixels(model.predict(None, params={"n": 1, "seed": seed, "steps": STEPS})[0])
    assert all(np.abs(edited[r, 1] - sample).max() <= 1 for r in range(2))  # gamma 0: the sample (measured: equal)
    assert np.abs(edited[0, 0] - edited[0, 2]).max() > 10  # a gamma of 6 changes the image

    unet, scheduler = load_local(tiny_model_dir, None)
    ddim = ddim_scheduler(scheduler, STEPS)
    timesteps = [int(s) for s in ddim.timesteps]
    x_T = torch.randn((1, *sample_shape(unet)), generator=torch.Generator().manual_seed(seed))  # `isosweep edit --seed 5`
    cli = edit_sample(unet.eval(), ddim, timesteps, timesteps.index(500), x_T, 3, directions, np.array(gammas),
                      lambda a, b: ((a - b) ** 2).flatten(1).mean(1), iterations=4)
    assert np.abs(edited - to_uint8(cli.grid.reshape(-1, 3, 8, 8).numpy()).reshape(edited.shape)).max() <= 1
    assert np.allclose(answer["singular_values"], cli.basis.singular_values.double().numpy(), rtol=1e-4)
    assert answer["edit_timestep"] == 500 and answer["directions"] == directions and answer["gammas"] == gammas


def test_an_inversion_is_the_cores_on_the_pngs_pixels_with_its_reconstruction(model, tiny_model_dir):
    png = model.predict(None, params={"n": 1, "seed": 3, "steps": STEPS})[0]
    answer = model.predict({"mode": "invert", "image": base64.b64encode(png).decode(), "steps": STEPS})
    assert answer["x_T_shape"] == [3, 8, 8] and len(answer["x_T"]) == 3 * 8 * 8
    x_T = torch.tensor(answer["x_T"]).reshape(1, 3, 8, 8)

    unet, scheduler = load_local(tiny_model_dir, None)
    image = torch.from_numpy(_pixels(png).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)
    expected = ddim_invert(unet, scheduler, image, STEPS, progress=False)
    assert torch.allclose(x_T, expected.float(), atol=1e-5)
    redrawn = ddim_sample(unet, scheduler, expected, STEPS, progress=False).images
    assert np.abs(_pixels(answer["reconstruction"]) - to_uint8(redrawn.numpy())[0].astype(int)).max() <= 1
    assert np.isclose(answer["reconstruction_mse"], float(((redrawn.double() - image.double()) ** 2).mean()), rtol=1e-4)


def test_several_rows_are_answered_row_by_row(model, saved):
    """A list of rows, or a DataFrame of several, gets a list: each row's answer is what it alone gets; params are
    every row's defaults. The logged input example (two rows: samples and an edit) answers with PNGs."""
    png = model.predict(None, params={"n": 1, "seed": 1, "steps": 3})[0]
    rows = [{"n": 2, "seed": 7}, {"mode": "edit", "seed": 7, "t": 200, "gammas": [0.0, 3.0]},
            {"mode": "invert", "image": base64.b64encode(png).decode()}]
    answers = model.predict(rows, params={"steps": 3})
    assert len(answers) == 3
    alone = [model.predict(row, params={"steps": 3}) for row in rows]
    assert answers[0] == alone[0] and len(answers[0]) == 2
    assert answers[1]["images"] == alone[1]["images"] and answers[1]["singular_values"] == alone[1]["singular_values"]
    assert answers[2]["x_T"] == alone[2]["x_T"] and answers[2]["reconstruction"] == alone[2]["reconstruction"]

    frame = pd.DataFrame([{"n": 2, "seed": 7, "steps": 3}, {"mode": "lerp", "seeds": [1, 2], "frames": 3, "steps": 3}])
    by_frame = model.predict(frame)  # absent cells are NaN, n a float there: still whole numbers
    assert by_frame[0] == alone[0] and len(by_frame[1]) == 3

    example = json.loads((saved / "serving_input_example.json").read_text())
    answers = model.predict(example["inputs"])
    assert [len(answers[0]), len(answers[1]["images"])] == [4, 3]
    assert all(_pixels(p).shape == (8, 8, 3) for p in answers[0] + answers[1]["images"])


def test_the_code_logged_with_the_model_never_shadows_an_installed_isosweep(saved):
    """MLflow puts the model's code folder (a few isosweep modules) first on sys.path. Where isosweep is installed, a
    fresh process that loads the model first still imports the rest of isosweep, and the processes it starts (which
    inherit sys.path: Ray's and torch's spawned workers) find the installed package, not the partial copy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import os, subprocess, sys\nimport mlflow\n"
            f"mlflow.pyfunc.load_model({str(saved)!r})\n"
            "import isosweep.core.ema\n"  # a module the logged copy lacks
            "child = 'import isosweep.core.ema, isosweep.cli; print(isosweep.cli.__file__)'\n"
            "out = subprocess.run([sys.executable, '-c', f'import sys; sys.path[:] = {sys.path!r}; ' + child],\n"
            "                     capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ''})\n"
            "print(out.returncode, out.stdout.strip(), out.stderr[-500:])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=saved.parent,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"0 {root / 'isosweep' / 'cli.py'}"), proc.stdout + proc.stderr[-2000:]
