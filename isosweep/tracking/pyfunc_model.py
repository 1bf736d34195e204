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
"""

from __future__ import annotations

import copy
import io
import threading
from typing import Any

import mlflow
import numpy as np
from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

MAX_IMAGES = 64  # images per request (n, frames): bounds a request's memory and time
MAX_STEPS = 1000  # DDIM steps per request: the DDPM schedules this serves have 1000 training steps
BATCH = 16  # images per UNet call
MODES = ("none", "slerp", "lerp")
DEVICES = ("auto", "cpu", "cuda")
DEFAULTS: dict[str, Any] = {"n": 4, "seed": 0, "seeds": [0, 1], "steps": 50, "mode": "none", "frames": 9, "device": "auto"}
INTS = ("n", "seed", "steps", "frames")

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

    def _ddim(self, unet: Any, x_T: Any, steps: int) -> np.ndarray:
        """DDIM (eta = 0) from x_T (B, C, H, W) -> uint8 images (B, H, W, C), as isosweep.core.sampling.ddim_sample."""
        import torch
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler_config)  # per request: set_timesteps keeps state
        ddim.set_timesteps(steps)
        param = next(unet.parameters())
        out = []
        with torch.inference_mode():
            for lo in range(0, x_T.shape[0], BATCH):
                x = x_T[lo : lo + BATCH].to(device=param.device, dtype=param.dtype)
                for t in [int(t) for t in ddim.timesteps]:
                    x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
                out.append(x.float().clamp(-1, 1).cpu())
        x = torch.cat(out).numpy().astype(np.float64)
        return ((x + 1.0) / 2.0 * 255.0).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    # no type hints here: MLflow would infer a signature from them instead of using SIGNATURE
    def predict(self, context, model_input, params=None):
        import torch

        req = parse_request(model_input, params)
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
        return [to_png(img) for img in self._ddim(unet, x_T, req["steps"])]


mlflow.models.set_model(DiffusersPipelineModel())
