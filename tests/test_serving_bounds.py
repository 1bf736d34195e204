"""The bounds on one request to the served model: a compute budget, a time limit and a cap on requests sampling at once.

The model is saved the way the registry logs it (`registry.save_served_model`: `tracking/pyfunc_model.py` and the
code it imports, the tiny 8x8 pipeline as its artifact) and loaded with `mlflow.pyfunc.load_model` under the serving settings of each test, then asked through
its real `predict`. `tests/test_serving.py` sends an over-budget request to `mlflow models serve` over HTTP.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np

import pytest
from mlflow.exceptions import MlflowException

from isosweep.tracking import pyfunc_model, registry


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("served") / "model"
    registry.save_served_model(path, tiny_model_dir)
    return path


@pytest.fixture
def load(saved_model, monkeypatch):
    """Load the saved model as a server started with these ISOSWEEP_SERVE_* settings would."""
    import mlflow

    def _load(**settings: str):
        for name in (pyfunc_model.BUDGET_ENV, pyfunc_model.TIMEOUT_ENV, pyfunc_model.CONCURRENT_ENV):
            monkeypatch.delenv(name, raising=False)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
        return mlflow.pyfunc.load_model(str(saved_model))

    return _load


def test_a_request_over_the_budget_is_refused_before_sampling(load):
    model = load(ISOSWEEP_SERVE_MAX_UNET_EVALS="20")
    assert len(model.predict(None, params={"n": 2, "steps": 10})) == 2  # 20: at the budget
    with pytest.raises(MlflowException) as e:
        model.predict(None, params={"n": 7, "steps": 3})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    message = e.value.message
    assert "n=7 x steps=3 = 21 UNet evaluations" in message and "budget of 20" in message, message
    assert "ISOSWEEP_SERVE_MAX_UNET_EVALS" in message and "at most 2 steps for 7 images" in message, message
    # an interpolation costs every frame; n does not count there
    with pytest.raises(MlflowException, match=r"frames=9 x steps=3 = 27 UNet evaluations"):
        model.predict(None, params={"mode": "slerp", "seeds": [1, 2], "frames": 9, "steps": 3, "n": 1})
    assert len(model.predict(None, params={"mode": "lerp", "seeds": [1, 2], "frames": 4, "steps": 5, "n": 64})) == 4


def test_the_default_budget_refuses_the_largest_request(load):
    """64 images x 1000 steps (what the limits on n and steps alone allow) is over the default of 64 x 50."""
    model = load()
    with pytest.raises(MlflowException, match=r"n=64 x steps=1000 = 64000 UNet evaluations, over this server's budget of 3200"):
        model.predict(None, params={"n": 64, "steps": 1000})


@pytest.mark.parametrize("name,value", [("ISOSWEEP_SERVE_MAX_UNET_EVALS", "lots"), ("ISOSWEEP_SERVE_TIMEOUT_S", "0"),
                                        ("ISOSWEEP_SERVE_MAX_CONCURRENT", "1.5")])
def test_a_bad_setting_stops_the_model_from_loading(load, name, value):
    with pytest.raises(MlflowException) as e:
        load(**{name: value})
    assert f"{name}={value!r}" in e.value.message and "unset it for the default" in e.value.message, e.value.message


def test_a_request_past_its_time_limit_stops_and_returns_nothing(load):
    model = load(ISOSWEEP_SERVE_TIMEOUT_S="0.05", ISOSWEEP_SERVE_MAX_UNET_EVALS="100000")
    with pytest.raises(MlflowException) as e:
        model.predict(None, params={"n": 2, "steps": 1000})  # seconds of work on this model: far past 0.05 s
    assert e.value.error_code == "DEADLINE_EXCEEDED"
    message = e.value.message
    assert "time limit of 0.05 s (ISOSWEEP_SERVE_TIMEOUT_S)" in message and "of 1000 DDIM steps on images 1-2 of 2" in message, message
    assert "no images are returned" in message
    assert model.unwrap_python_model().sampling == 0  # its slot is free again
    assert len(model.predict(None, params={"n": 1, "steps": 1})) == 1  # a short request still fits


def test_requests_beyond_the_cap_wait_for_a_free_slot(load):
    """With one slot, a one-step request sent while a long one samples gets its images only after the long one."""
    model = load(ISOSWEEP_SERVE_MAX_CONCURRENT="1", ISOSWEEP_SERVE_TIMEOUT_S="600", ISOSWEEP_SERVE_MAX_UNET_EVALS="100000")
    inner = model.unwrap_python_model()
    finished: list[str] = []

    def ask(name: str, params: dict) -> None:
        model.predict(None, params=params)
        finished.append(name)

    long = threading.Thread(target=ask, args=("long", {"n": 1, "steps": 100}))
    long.start()
    deadline = time.monotonic() + 60
    while inner.sampling == 0 and long.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert inner.sampling == 1, "the long request never started sampling"
    short = threading.Thread(target=ask, args=("short", {"n": 1, "steps": 1}))
    short.start()
    long.join(120)
    short.join(120)
    assert finished == ["long", "short"]


def test_edits_inversions_and_rows_count_against_the_budget(load):
    """An edit costs its steps, its edited images and its Local Basis rounds; an inversion 2 x steps; rows add up."""
    model = load(ISOSWEEP_SERVE_MAX_UNET_EVALS="60")
    # 10 steps (900, 800, ... 0), t=500 the 5th: 4 steps to t, (1 + 1 x 3) images x 6 steps, (2 + 2) rounds x 5 vectors
    edit = {"mode": "edit", "seed": 0, "steps": 10, "t": 500, "directions": [0], "gammas": [-1.0, 0.0, 1.0], "iterations": 2}
    assert len(model.predict(edit)["images"]) == 3  # 4 + 24 + 20 = 48
    assert len(model.predict({**edit, "directions": [1]})["images"]) == 3  # 6 vectors: 4 + 24 + 24 = 52
    with pytest.raises(MlflowException) as e:
        model.predict({**edit, "directions": [0, 1]})
    assert "4 steps to t + images=7 x 6 steps from t + (iterations=2 + 2) x vectors=6 = 70 UNet evaluations" in e.value.message
    assert "budget of 60" in e.value.message and "fewer steps, directions, gammas or iterations" in e.value.message
    png = base64.b64encode(model.predict(None, params={"n": 1, "steps": 2})[0]).decode()
    assert len(model.predict({"mode": "invert", "image": png, "steps": 30})["x_T"]) == 3 * 8 * 8
    with pytest.raises(MlflowException, match=r"2 x steps=31 \(inversion, redraw\) = 62 UNet evaluations, over this server's budget of 60"):
        model.predict({"mode": "invert", "image": png, "steps": 31})
    # rows: each within the budget, their total over it; refused before any row runs
    inner = model.unwrap_python_model()
    with pytest.raises(MlflowException) as e:
        model.predict([{"n": 2, "steps": 10}, {"n": 2, "steps": 15}, {"n": 1, "steps": 11}])
    assert "these 3 rows cost 20 + 30 + 11 = 61 UNet evaluations together, over this server's budget of 60" in e.value.message
    assert inner.sampling == 0
    assert len(model.predict([{"n": 2, "steps": 10}, {"n": 2, "steps": 15}, {"n": 1, "steps": 10}])) == 3


@pytest.mark.parametrize("what,image", [
    ("not base64", "not//base64!"),
    ("a JPEG", "jpeg"),
    ("the wrong size", "png16"),
    ("too large", "A" * (6 * 2**20)),
    ("empty", ""),
])
def test_an_invert_request_refuses_an_image_that_is_no_png_of_the_models_size(load, what, image):
    from PIL import Image

    if image in ("jpeg", "png16"):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((16 if image == "png16" else 8,) * 2 + (3,), np.uint8)).save(buf, format="JPEG" if image == "jpeg" else "PNG")
        image = base64.b64encode(buf.getvalue()).decode()
    model = load()
    with pytest.raises(MlflowException) as e:
        model.predict([{"n": 1, "steps": 1}, {"mode": "invert", "image": image, "steps": 2}])
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    message = e.value.message
    assert message.startswith("row 1: 'image' must be a base64 PNG of this model's size 8x8, at most 4 MiB"), message
    assert "\n" not in message and len(message) < 400, message
    assert model.unwrap_python_model().sampling == 0  # refused before the first row sampled


def test_an_edit_past_its_time_limit_stops_between_steps(load):
    model = load(ISOSWEEP_SERVE_TIMEOUT_S="0.05", ISOSWEEP_SERVE_MAX_UNET_EVALS="100000")
    with pytest.raises(MlflowException) as e:
        model.predict({"mode": "edit", "steps": 1000, "t": 0, "gammas": [1.0]})  # 999 steps to t: far past 0.05 s
    assert e.value.error_code == "DEADLINE_EXCEEDED"
    assert "of 999 DDIM steps to t (edit)" in e.value.message and "no images are returned" in e.value.message, e.value.message
    assert model.unwrap_python_model().sampling == 0
