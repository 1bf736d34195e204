"""The bounds on one request to the served model: a compute budget, a time limit and a cap on requests sampling at once.

The model is saved the way the registry logs it (`tracking/pyfunc_model.py` as code, the tiny 8x8 pipeline as its
artifact) and loaded with `mlflow.pyfunc.load_model` under the serving settings of each test, then asked through
its real `predict`. `tests/test_serving.py` sends an over-budget request to `mlflow models serve` over HTTP.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.exceptions import MlflowException

from isosweep.tracking import pyfunc_model, registry


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model_dir):
    import mlflow

    path = tmp_path_factory.mktemp("served") / "model"
    mlflow.pyfunc.save_model(path=str(path), python_model=str(registry.PYFUNC_CODE), artifacts={registry.PIPELINE_KEY: str(tiny_model_dir)},
                             signature=pyfunc_model.SIGNATURE, pip_requirements=registry.pip_requirements())
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
