"""MLflow "model from code": a pyfunc that serves PNG samples and interpolation strips of a diffusers DDPM pipeline.

This file is logged as the model's code (``python_model=<this file's path>``), so a registered model
loads and serves with mlflow, torch, diffusers and pillow only: it must never import isosweep. It owns
the request format (``SIGNATURE``, the limits, the defaults); `registry.py` logs the model with it.

The model's artifacts hold one diffusers pipeline directory under the key ``pipeline``. After
``mlflow.artifacts.download_artifacts("models:/NAME@champion", dst_path=D)`` that directory is
``D/artifacts/pipeline`` and ``diffusers.DDPMPipeline.from_pretrained(D / "artifacts" / "pipeline")``
loads it without MLflow at all.

A request is a set of params (the signature's ``ParamSchema``; MLflow checks their types and fills in
the defaults before ``predict`` runs):

    n       images to sample in mode "none" (1..MAX_IMAGES), default 4
    seed    mode "none": the latents (n, C, H, W) come from torch.Generator().manual_seed(seed), default 0
    seeds   modes "slerp"/"lerp": the two endpoint seeds, each one latent (1, C, H, W), default [0, 1]
    steps   DDIM steps, eta = 0 (1..MAX_STEPS), default 50
    mode    "none" (samples), "slerp" or "lerp" (frames along the path between the two seeds' latents)
    frames  images along the path in modes slerp/lerp, ends included (2..MAX_IMAGES), default 9
    device  "auto" (MLFLOW_DEFAULT_PREDICTION_DEVICE, else CUDA when there is one, else the CPU), "cpu", "cuda"

These are the latents, the paths and the sampler of ``isosweep sample`` and ``isosweep interpolate``, so a
served image equals the CLI's for the same model, seed and steps (on the same device). The data part of a
request carries nothing; the same names given there (``{"inputs": {"n": 2}}``, or
``predict({"n": 2})`` in Python) are accepted too and win over params. Output: one PNG (bytes) per
image, in order; the scoring server sends each as a base64 string. A bad request raises an
``MlflowException`` with INVALID_PARAMETER_VALUE naming the parameter (HTTP 400 from ``mlflow models serve``).

What one request may cost is bounded by three settings of the serving process, read when the model loads:

    ISOSWEEP_SERVE_MAX_UNET_EVALS   images x steps per request (every frame counts), default 3200 (64 x 50);
                                    a request over it is refused before sampling (INVALID_PARAMETER_VALUE, 400)
    ISOSWEEP_SERVE_TIMEOUT_S        seconds a request may take, waiting for a slot included; default the scoring
                                    server's own MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60); past it sampling stops
                                    between steps and the request fails (DEADLINE_EXCEEDED, 504), no images returned
    ISOSWEEP_SERVE_MAX_CONCURRENT   requests sampling at once, default 1; the others wait their turn within their
                                    time limit, then are refused as busy (TEMPORARILY_UNAVAILABLE, 503)
"""

from __future__ import annotations

import copy
import io
import os
import threading
import time
from typing import Any

import mlflow
import numpy as np
from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

MAX_IMAGES = 64  # images per request (n, frames): bounds a request's memory and time
MAX_STEPS = 1000  # DDIM steps per request: the DDPM schedules this serves have 1000 training steps
BATCH = 16  # images per UNet call
MODES = ("none", "slerp", "lerp")
DEVICES = ("auto", "cpu", "cuda")
DEFAULTS: dict[str, Any] = {"n": 4, "seed": 0, "seeds": [0, 1], "steps": 50, "mode": "none", "frames": 9, "device": "auto"}
INTS = ("n", "seed", "steps", "frames")
BUDGET_ENV = "ISOSWEEP_SERVE_MAX_UNET_EVALS"  # images x steps one request may cost
TIMEOUT_ENV = "ISOSWEEP_SERVE_TIMEOUT_S"  # seconds one request may take
CONCURRENT_ENV = "ISOSWEEP_SERVE_MAX_CONCURRENT"  # requests sampling at once in one process
DEFAULT_BUDGET = 64 * 50  # the most images at the default steps
DEFAULT_CONCURRENT = 1  # one request has the whole device

SIGNATURE = ModelSignature(
    inputs=None,  # an unconditional model: everything a request says is a param
    outputs=Schema([ColSpec(DataType.binary, "image")]),  # as mlflow.diffusers: one PNG per image
    params=ParamSchema([
        ParamSpec("n", DataType.long, DEFAULTS["n"]),
        ParamSpec("seed", DataType.long, DEFAULTS["seed"]),
        ParamSpec("seeds", DataType.long, DEFAULTS["seeds"], shape=(-1,)),
        ParamSpec("steps", DataType.long, DEFAULTS["steps"]),
        ParamSpec("mode", DataType.string, DEFAULTS["mode"]),
        ParamSpec("frames", DataType.long, DEFAULTS["frames"]),
        ParamSpec("device", DataType.string, DEFAULTS["device"]),
    ]),
)


def _bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _scalar(name: str, value: Any) -> Any:
    """One value from a plain value, a list or array of one (the JSON `inputs` form gives 0-d arrays)."""
    arr = np.asarray(value, dtype=object)
    if arr.size != 1:
        raise _bad(f"'{name}' must be a single value, got {value!r}")
    out = arr.reshape(-1)[0]
    return out.item() if isinstance(out, np.generic) else out


def _int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _bad(f"'{name}' must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _fields_of(model_input: Any) -> dict[str, Any]:
    """The request fields given in the data part: None, {}, a dict, or a one-row DataFrame."""
    if model_input is None:
        return {}
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame
        if len(model_input) == 0:
            return {}
        if len(model_input) != 1:
            raise _bad(f"one request per call: the input has {len(model_input)} rows; put the request in params")
        model_input = {k: model_input[k].iloc[0] for k in model_input.columns}
    if not isinstance(model_input, dict):
        raise _bad(f"the input must be empty or a dict of request fields, got {type(model_input).__name__}; "
                   f"put the request in params ({', '.join(DEFAULTS)})")
    unknown = sorted(set(map(str, model_input)) - set(DEFAULTS))
    if unknown:
        raise _bad(f"unknown request field(s) {unknown}; known: {list(DEFAULTS)}")
    return {str(k): v for k, v in model_input.items()}


def parse_request(model_input: Any, params: dict[str, Any] | None) -> dict[str, Any]:
    """The checked request: defaults, then params, then fields in the input. Raises INVALID_PARAMETER_VALUE."""
    req = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if k in DEFAULTS and v is not None}}
    for k, v in _fields_of(model_input).items():
        if k == "seeds":
            req[k] = np.asarray(v, dtype=object).reshape(-1).tolist()
        else:
            req[k] = _scalar(k, v)
    for k in INTS:
        req[k] = _int(k, req[k])
    req["seeds"] = [_int("seeds", s.item() if isinstance(s, np.generic) else s) for s in req["seeds"]]
    for k in ("mode", "device"):
        if not isinstance(req[k], str):
            raise _bad(f"'{k}' must be a string, got {req[k]!r}")
    if req["mode"] not in MODES:
        raise _bad(f"unknown interpolation mode {req['mode']!r} for 'mode'; use one of {list(MODES)}")
    if req["device"] not in DEVICES:
        raise _bad(f"unknown device {req['device']!r} for 'device'; use one of {list(DEVICES)}")
    if not 1 <= req["steps"] <= MAX_STEPS:
        raise _bad(f"'steps' must be in 1..{MAX_STEPS}, got {req['steps']}")
    if req["mode"] == "none" and not 1 <= req["n"] <= MAX_IMAGES:
        raise _bad(f"'n' must be in 1..{MAX_IMAGES} (the most images one request may ask for), got {req['n']}")
    if req["mode"] != "none":
        if not 2 <= req["frames"] <= MAX_IMAGES:
            raise _bad(f"'frames' must be in 2..{MAX_IMAGES} (the most images one request may ask for), got {req['frames']}")
        if len(req["seeds"]) != 2:
            raise _bad(f"'seeds' must hold the two endpoint seeds of the path, got {req['seeds']}")
    return req


def request_cost(req: dict[str, Any]) -> tuple[str, int]:
    """What a checked request costs in UNet evaluations (one image through one DDIM step): ("n=4 x steps=50", 200)."""
    images = "n" if req["mode"] == "none" else "frames"
    return f"{images}={req[images]} x steps={req['steps']}", req[images] * req["steps"]


def check_budget(req: dict[str, Any], budget: int) -> None:
    """Refuse a request that costs more than `budget` UNet evaluations, before anything is sampled."""
    what, cost = request_cost(req)
    if cost > budget:
        images = cost // req["steps"]
        fits = f"at most {budget // images} steps for {images} images" if budget >= images else f"at most {budget} images"
        raise _bad(f"this request costs {what} = {cost} UNet evaluations, over this server's budget of {budget} per request "
                   f"({BUDGET_ENV}); ask for fewer images or steps ({fits}), or raise {BUDGET_ENV} where the server starts")


def _setting(name: str, default: Any, kind: type, least: float) -> Any:
    """A positive number from the environment (`kind` int or float, at least `least`); a bad value stops the model's load."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= least or value == float("inf"):
        raise MlflowException(f"{name}={text!r} is not a {'whole ' if kind is int else ''}number >= {least}; "
                              f"set it to one, or unset it for the default {default}")
    return value


def serving_limits() -> dict[str, Any]:
    """The bounds on one request this process serves under (see the module docstring)."""
    return {
        "budget": _setting(BUDGET_ENV, DEFAULT_BUDGET, int, 1),
        "timeout_s": _setting(TIMEOUT_ENV, float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()), float, 1e-3),
        "concurrent": _setting(CONCURRENT_ENV, DEFAULT_CONCURRENT, int, 1),
    }


def slerp(a: Any, b: Any, s: Any) -> Any:
    """Spherical interpolation per pair, as isosweep.evaluation.metrics.paths.slerp: a, b (B, ...), s (B,) -> (B, ...).

    Float64 inside, a's dtype out; pairs closer than 1e-7 rad fall back to lerp.
    """
    import torch

    s64 = s.double().reshape(-1, *([1] * (a.ndim - 1)))
    a64, b64 = a.double(), b.double()
    af, bf = a64.flatten(1), b64.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-300)
    omega = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(s64.shape)
    sin_omega = torch.sin(omega)
    near = sin_omega.abs() < 1e-7
    safe = torch.where(near, torch.ones_like(sin_omega), sin_omega)
    wa = torch.where(near, 1 - s64, torch.sin((1 - s64) * omega) / safe)
    wb = torch.where(near, s64, torch.sin(s64 * omega) / safe)
    return (wa * a64 + wb * b64).to(a.dtype)


def lerp(a: Any, b: Any, s: Any) -> Any:
    """(1 - s) a + s b per pair in float64, a's dtype out: a, b (B, ...), s (B,) -> (B, ...)."""
    s64 = s.double().reshape(-1, *([1] * (a.ndim - 1)))
    return ((1 - s64) * a.double() + s64 * b.double()).to(a.dtype)


def to_png(image: np.ndarray) -> bytes:
    """One uint8 image (H, W, C), C in {1, 3, 4} -> PNG bytes (L, RGB or RGBA)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """DDIM (eta = 0) samples and interpolation strips of the UNet and scheduler of a DDPM pipeline directory."""

    def load_context(self, context: Any) -> None:
        import torch
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(context.artifacts["pipeline"])
        self.scheduler_config = pipe.scheduler.config
        self.device = MLFLOW_DEFAULT_PREDICTION_DEVICE.get() or ("cuda" if torch.cuda.is_available() else "cpu")
        self._unets = {self.device: pipe.unet.to(self.device).eval()}
        self._lock = threading.Lock()
        self.limits = serving_limits()
        self._slots = threading.BoundedSemaphore(self.limits["concurrent"])
        self.sampling = 0  # requests holding a slot now

    def _unet(self, wanted: str) -> Any:
        """The UNet on the device a request asks for; a copy is made once per other device."""
        import torch

        device = self.device if wanted == "auto" else wanted
        if device == "cuda" and not torch.cuda.is_available():
            raise _bad("'device' is 'cuda' but this server has no CUDA device; use 'auto' or 'cpu'")
        with self._lock:
            if device not in self._unets:
                self._unets[device] = copy.deepcopy(next(iter(self._unets.values()))).to(device).eval()
            return self._unets[device]

    def _acquire_slot(self, started: float) -> None:
        """Wait for one of the sampling slots until the request's time limit; refuse it as busy after that."""
        timeout_s = self.limits["timeout_s"]
        if not self._slots.acquire(timeout=max(0.0, started + timeout_s - time.monotonic())):
            raise MlflowException(f"the server is busy: {self.limits['concurrent']} request(s) were sampling ({CONCURRENT_ENV}) "
                                  f"for all of this request's time limit of {timeout_s:g} s ({TIMEOUT_ENV}); retry later, "
                                  f"or raise {CONCURRENT_ENV} where the server starts", error_code=TEMPORARILY_UNAVAILABLE)
        with self._lock:
            self.sampling += 1

    def _release_slot(self) -> None:
        with self._lock:
            self.sampling -= 1
        self._slots.release()

    def _ddim(self, unet: Any, x_T: Any, steps: int, started: float) -> np.ndarray:
        """DDIM (eta = 0) from x_T (B, C, H, W) -> uint8 images (B, H, W, C), as isosweep.core.sampling.ddim_sample.

        Stops between UNet calls once the request is past its time limit (counted from `started`, a monotonic time).
        """
        import torch
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler_config)  # per request: set_timesteps keeps state
        ddim.set_timesteps(steps)
        param = next(unet.parameters())
        out = []
        with torch.inference_mode():
            for lo in range(0, x_T.shape[0], BATCH):
                x = x_T[lo : lo + BATCH].to(device=param.device, dtype=param.dtype)
                for done, t in enumerate(int(t) for t in ddim.timesteps):
                    self._check_deadline(started, f"{done} of {steps} DDIM steps on images {lo + 1}-{lo + len(x)} of {len(x_T)}")
                    x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
                out.append(x.float().clamp(-1, 1).cpu())
        x = torch.cat(out).numpy().astype(np.float64)
        return ((x + 1.0) / 2.0 * 255.0).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def _check_deadline(self, started: float, progress: str) -> None:
        timeout_s = self.limits["timeout_s"]
        if time.monotonic() - started > timeout_s:
            raise MlflowException(f"the request ran past this server's time limit of {timeout_s:g} s ({TIMEOUT_ENV}) and was stopped "
                                  f"after {progress}; no images are returned; ask for fewer images or steps, or raise {TIMEOUT_ENV} "
                                  f"(and `mlflow models serve --timeout`) where the server starts", error_code=DEADLINE_EXCEEDED)

    # no type hints here: MLflow would infer a signature from them instead of using SIGNATURE
    def predict(self, context, model_input, params=None):
        import torch

        started = time.monotonic()
        req = parse_request(model_input, params)
        check_budget(req, self.limits["budget"])
        unet = self._unet(req["device"])
        size = unet.config.sample_size  # an int or (H, W)
        shape = (int(unet.config.in_channels), *((size, size) if isinstance(size, int) else map(int, size)))

        def noise(seed: int, n: int = 1) -> Any:  # the latents of `isosweep sample --seed` / `interpolate --seeds`
            return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

        if req["mode"] == "none":
            x_T = noise(req["seed"], req["n"])
        else:
            frames = req["frames"]
            a, b = (noise(s).expand(frames, *shape) for s in req["seeds"])
            x_T = (slerp if req["mode"] == "slerp" else lerp)(a, b, torch.linspace(0.0, 1.0, frames))
        self._acquire_slot(started)
        try:
            images = self._ddim(unet, x_T, req["steps"], started)
        finally:
            self._release_slot()
        return [to_png(img) for img in images]


mlflow.models.set_model(DiffusersPipelineModel())
