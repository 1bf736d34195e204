"""MLflow "model from code": a pyfunc that serves PNG samples, interpolation strips, Local Basis edits and DDIM
inversions of a diffusers DDPM pipeline.

This file is logged as the model's code (``python_model=<this file's path>``); of isosweep it imports only what is
logged with it (``registry.SERVED_CODE`` as MLflow's ``code_paths``: `serving_modes.py` and the `core` math), so a
registered model loads and serves with mlflow, torch, diffusers and pillow only. It owns the request format
(``SIGNATURE``, the limits, the defaults); `registry.py` logs the model with it.

The model's artifacts hold one diffusers pipeline directory under the key ``pipeline``. After
``mlflow.artifacts.download_artifacts("models:/NAME@champion", dst_path=D)`` that directory is
``D/artifacts/pipeline`` and ``diffusers.DDPMPipeline.from_pretrained(D / "artifacts" / "pipeline")``
loads it without MLflow at all.

A request is a set of params (the signature's ``ParamSchema``; MLflow checks their types and fills in
the defaults before ``predict`` runs):

    n       images to sample in mode "none" (1..MAX_IMAGES), default 4
    seed    modes "none"/"edit": the latents (n, C, H, W) come from torch.Generator().manual_seed(seed), default 0
    seeds   modes "slerp"/"lerp": the two endpoint seeds, each one latent (1, C, H, W), default [0, 1]
    steps   DDIM steps, eta = 0 (1..MAX_STEPS), default 50; in mode "invert" the inversion's and the redraw's
    mode    "none" (samples), "slerp" or "lerp" (frames along the path between the two seeds' latents), "edit"
            (Local Basis edits of seed's sample), "invert" (an image to its x_T): `serving_modes.py`
    frames  images along the path in modes slerp/lerp, ends included (2..MAX_IMAGES), default 9
    t, directions, gammas, iterations   mode "edit": the timestep, the Local Basis indices (rows), the steps along
            each (columns), the subspace-iteration rounds; defaults 500, [0], [-8, 0, 8], 8
    image   mode "invert": a PNG of the model's size, base64
    device  "auto" (MLFLOW_DEFAULT_PREDICTION_DEVICE, else CUDA when there is one, else the CPU), "cpu", "cuda"

These are the latents, the paths and the sampler of ``isosweep sample``, ``interpolate``, ``edit`` and ``invert``,
so a served image equals the CLI's for the same model, seed and steps (on the same device). The data part of a
request may carry the same names (``{"inputs": {"n": 2}}``, or ``predict({"n": 2})`` in Python), which win over
params; a list of such rows (``{"inputs": [{...}, {...}]}``, or a DataFrame of several rows) is answered row by
row, each row a request of its own with params as its defaults. Output of one request: modes none/slerp/lerp one
PNG (bytes) per image, in order; edit and invert a dict (`serving_modes.py`); of several rows, a list of those
answers. The scoring server sends each PNG as a base64 string. A bad request raises an ``MlflowException`` with
INVALID_PARAMETER_VALUE naming the parameter (HTTP 400 from ``mlflow models serve``).

What one request may cost is bounded by three settings of the serving process, read when the model loads:

    ISOSWEEP_SERVE_MAX_UNET_EVALS   UNet evaluations per request, all its rows together, default 3200 (64 x 50):
                                    images x steps (every frame counts); an edit counts its steps, edited images
                                    and Local Basis rounds (`serving_modes.edit_cost`), an inversion 2 x steps;
                                    a request over it is refused before sampling (INVALID_PARAMETER_VALUE, 400)
    ISOSWEEP_SERVE_TIMEOUT_S        seconds a request may take, waiting for a slot included; default the scoring
                                    server's own MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60); past it sampling stops
                                    between steps and the request fails (DEADLINE_EXCEEDED, 504), no images returned
    ISOSWEEP_SERVE_MAX_CONCURRENT   requests sampling at once, default 1; the others wait their turn within their
                                    time limit, then are refused as busy (TEMPORARILY_UNAVAILABLE, 503)
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
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



def _prefer_installed_isosweep() -> None:
    """MLflow puts the model's logged code folder (a few isosweep modules, `registry.SERVED_CODE`) first on sys.path.
    Where isosweep is installed, that partial copy must not shadow it, neither here (a later `import isosweep.x` of a
    module the copy lacks) nor in the processes this one starts, which inherit sys.path: it is taken off the path
    while an installed isosweep imports, and put back only where there is none."""
    logged = [p for p in sys.path if os.path.isfile(os.path.join(p, "isosweep", "tracking", "serving_modes.py"))
              and not os.path.isfile(os.path.join(p, "isosweep", "cli.py"))]
    if not logged:
        return
    sys.path[:] = [p for p in sys.path if p not in logged]
    if "isosweep" in sys.modules:  # imported already: its own __path__ finds its modules
        return
    try:
        importlib.import_module("isosweep.tracking.serving_modes")  # the installed package
    except ImportError:
        for name in [m for m in sys.modules if m == "isosweep" or m.startswith("isosweep.")]:
            del sys.modules[name]
        sys.path[:0] = logged  # no isosweep here: the copy logged with the model serves


_prefer_installed_isosweep()

from isosweep.tracking.serving_modes import (  # noqa: E402  (after the path is settled)
    EDIT_DEFAULTS, INVERT_DEFAULTS, bad, check_edit, edit_cost, integer, read_png, run_edit, run_invert, scalar, to_png,
)

MAX_IMAGES = 64  # images per request (n, frames): bounds a request's memory and time
MAX_STEPS = 1000  # DDIM steps per request: the DDPM schedules this serves have 1000 training steps
BATCH = 16  # images per UNet call
MODES = ("none", "slerp", "lerp", "edit", "invert")
DEVICES = ("auto", "cpu", "cuda")
DEFAULTS: dict[str, Any] = {"n": 4, "seed": 0, "seeds": [0, 1], "steps": 50, "mode": "none", "frames": 9, "device": "auto",
                            **EDIT_DEFAULTS, **INVERT_DEFAULTS}
INTS = ("n", "seed", "steps", "frames", "t", "iterations")
LISTS = ("seeds", "directions", "gammas")  # fields holding several values
BUDGET_ENV = "ISOSWEEP_SERVE_MAX_UNET_EVALS"  # UNet evaluations one request may cost, all its rows together
TIMEOUT_ENV = "ISOSWEEP_SERVE_TIMEOUT_S"  # seconds one request may take
CONCURRENT_ENV = "ISOSWEEP_SERVE_MAX_CONCURRENT"  # requests sampling at once in one process
DEFAULT_BUDGET = 64 * 50  # the most images at the default steps
DEFAULT_CONCURRENT = 1  # one request has the whole device

SIGNATURE = ModelSignature(
    inputs=None,  # an unconditional model: everything a request says is a param
    outputs=Schema([ColSpec(DataType.binary, "image")]),  # as mlflow.diffusers: one PNG per image (edit, invert: dicts)
    params=ParamSchema([
        ParamSpec("n", DataType.long, DEFAULTS["n"]),
        ParamSpec("seed", DataType.long, DEFAULTS["seed"]),
        ParamSpec("seeds", DataType.long, DEFAULTS["seeds"], shape=(-1,)),
        ParamSpec("steps", DataType.long, DEFAULTS["steps"]),
        ParamSpec("mode", DataType.string, DEFAULTS["mode"]),
        ParamSpec("frames", DataType.long, DEFAULTS["frames"]),
        ParamSpec("device", DataType.string, DEFAULTS["device"]),
        ParamSpec("t", DataType.long, DEFAULTS["t"]),
        ParamSpec("directions", DataType.long, DEFAULTS["directions"], shape=(-1,)),
        ParamSpec("gammas", DataType.double, DEFAULTS["gammas"], shape=(-1,)),
        ParamSpec("iterations", DataType.long, DEFAULTS["iterations"]),
        ParamSpec("image", DataType.string, DEFAULTS["image"]),
    ]),
)


def _rows_of(model_input: Any) -> tuple[list[dict[str, Any]], bool]:
    """The request rows given in the data part, and whether it is a list of rows (answered by a list): None, {} or a
    dict (one request), a list of dicts, or a DataFrame (one request when it has one row)."""
    if model_input is None:
        return [{}], False
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame; absent cells are NaN/None
        rows = [{str(k): v for k, v in row.items() if not _missing(v)} for row in model_input.to_dict(orient="records")]
        return (rows or [{}]), len(rows) > 1
    if isinstance(model_input, dict):
        return [model_input], False
    if isinstance(model_input, list) and model_input and all(isinstance(r, dict) for r in model_input):
        return model_input, True
    raise bad(f"the input must be empty, a dict of request fields or a list of such rows, got {type(model_input).__name__}; "
              f"or put the request in params ({', '.join(DEFAULTS)})")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(map(str, row)) - set(DEFAULTS))
    if unknown:
        raise bad(f"unknown request field(s) {unknown}; known: {list(DEFAULTS)}")
    out = {}
    for k, v in row.items():
        if k in LISTS:
            out[str(k)] = np.asarray(v, dtype=object).reshape(-1).tolist()
        else:
            v = scalar(k, v)  # a DataFrame with absent cells holds its whole numbers as floats
            out[str(k)] = int(v) if k in INTS and isinstance(v, float) and v.is_integer() else v
    return out


def parse_request(model_input: Any, params: dict[str, Any] | None) -> dict[str, Any]:
    """The checked request of a call with one row: defaults, then params, then fields in the input."""
    rows, many = _rows_of(model_input)
    if many or len(rows) != 1:
        raise bad(f"one request expected, got {len(rows)} rows")
    return check_request({**_defaults(params), **_fields(rows[0])})


def parse_rows(model_input: Any, params: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    """Every row's checked request (params are each row's defaults) and whether the input was a list of rows; a bad
    row is refused naming its index. Raises INVALID_PARAMETER_VALUE."""
    rows, many = _rows_of(model_input)
    base = _defaults(params)
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(check_request({**base, **_fields(row)}))
        except MlflowException as exc:
            if not many:
                raise
            raise bad(f"row {i}: {exc.message}") from None
    return out, many


def _defaults(params: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULTS, **{k: v for k, v in (params or {}).items() if k in DEFAULTS and v is not None}}


def check_request(req: dict[str, Any]) -> dict[str, Any]:
    """One request's fields checked and normalised (ints, lists, modes); raises INVALID_PARAMETER_VALUE."""
    for k in INTS:
        req[k] = integer(k, req[k])
    req["seeds"] = [integer("seeds", s.item() if isinstance(s, np.generic) else s) for s in req["seeds"]]
    for k in ("mode", "device"):
        if not isinstance(req[k], str):
            raise bad(f"'{k}' must be a string, got {req[k]!r}")
    if req["mode"] not in MODES:
        raise bad(f"unknown mode {req['mode']!r} for 'mode'; use one of {list(MODES)}")
    if req["device"] not in DEVICES:
        raise bad(f"unknown device {req['device']!r} for 'device'; use one of {list(DEVICES)}")
    if not 1 <= req["steps"] <= MAX_STEPS:
        raise bad(f"'steps' must be in 1..{MAX_STEPS}, got {req['steps']}")
    if req["mode"] == "none" and not 1 <= req["n"] <= MAX_IMAGES:
        raise bad(f"'n' must be in 1..{MAX_IMAGES} (the most images one request may ask for), got {req['n']}")
    if req["mode"] in ("slerp", "lerp"):
        if not 2 <= req["frames"] <= MAX_IMAGES:
            raise bad(f"'frames' must be in 2..{MAX_IMAGES} (the most images one request may ask for), got {req['frames']}")
        if len(req["seeds"]) != 2:
            raise bad(f"'seeds' must hold the two endpoint seeds of the path, got {req['seeds']}")
    if req["mode"] == "edit":
        check_edit(req, MAX_IMAGES)
    return req


def request_cost(req: dict[str, Any], scheduler: Any = None) -> tuple[str, int]:
    """What a checked request costs in UNet evaluations (one image through one DDIM step): ("n=4 x steps=50", 200).
    An edit's cost depends on the model's schedule (`scheduler`, its training scheduler)."""
    if req["mode"] == "edit":
        return edit_cost(req, scheduler)
    if req["mode"] == "invert":
        return f"2 x steps={req['steps']} (inversion, redraw)", 2 * req["steps"]
    images = "n" if req["mode"] == "none" else "frames"
    return f"{images}={req[images]} x steps={req['steps']}", req[images] * req["steps"]


def check_budget(reqs: list[dict[str, Any]], budget: int, scheduler: Any = None) -> None:
    """Refuse a request whose rows together cost more than `budget` UNet evaluations, before anything is sampled."""
    costs = [request_cost(req, scheduler) for req in reqs]
    total = sum(cost for _, cost in costs)
    if total <= budget:
        return
    fix = f"or raise {BUDGET_ENV} where the server starts"
    if len(reqs) > 1:
        raise bad(f"these {len(reqs)} rows cost {' + '.join(str(c) for _, c in costs)} = {total} UNet evaluations together, "
                  f"over this server's budget of {budget} per request ({BUDGET_ENV}); send fewer rows, images or steps, {fix}")
    (what, cost), req = costs[0], reqs[0]
    if req["mode"] in ("none", "slerp", "lerp"):
        images = cost // req["steps"]
        fits = f"at most {budget // images} steps for {images} images" if budget >= images else f"at most {budget} images"
        ask = f"ask for fewer images or steps ({fits})"
    else:
        ask = "ask for fewer steps" + (", directions, gammas or iterations" if req["mode"] == "edit" else "")
    raise bad(f"this request costs {what} = {cost} UNet evaluations, over this server's budget of {budget} per request "
              f"({BUDGET_ENV}); {ask}, {fix}")


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


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """DDIM (eta = 0) samples and interpolation strips of the UNet and scheduler of a DDPM pipeline directory."""

    def load_context(self, context: Any) -> None:
        import torch
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(context.artifacts["pipeline"])
        self.scheduler = pipe.scheduler
        self.scheduler_config = pipe.scheduler.config
        self.device = MLFLOW_DEFAULT_PREDICTION_DEVICE.get() or ("cuda" if torch.cuda.is_available() else "cpu")
        self._unets = {self.device: pipe.unet.to(self.device).eval()}
        self._lock = threading.Lock()
        self._edit_lock = threading.Lock()  # one edit at a time on the editing copy of the UNet
        self.limits = serving_limits()
        self._slots = threading.BoundedSemaphore(self.limits["concurrent"])
        self.sampling = 0  # requests holding a slot now

    def _unet(self, wanted: str, role: str = "sample") -> Any:
        """The UNet on the device a request asks for; a copy is made once per other device, and one for editing (the
        Local Basis switches the UNet's attention and its weights' grad flags while it runs)."""
        import torch

        device = self.device if wanted == "auto" else wanted
        if device == "cuda" and not torch.cuda.is_available():
            raise bad("'device' is 'cuda' but this server has no CUDA device; use 'auto' or 'cpu'")
        with self._lock:
            key = device if role == "sample" else (device, role)
            if key not in self._unets:
                self._unets[key] = copy.deepcopy(next(iter(self._unets.values()))).to(device).eval()
            return self._unets[key]

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
        started = time.monotonic()
        reqs, many = parse_rows(model_input, params)
        check_budget(reqs, self.limits["budget"], self.scheduler)
        shape = self._shape()
        images = {}
        for i, req in enumerate(reqs):  # every PNG read before anything is sampled
            if req["mode"] == "invert":
                try:
                    images[i] = read_png(req["image"], shape)
                except MlflowException as exc:
                    raise bad(f"row {i}: {exc.message}" if many else exc.message) from None
        for req in reqs:
            self._unet(req["device"])  # a device this server lacks is refused before any row runs
        self._acquire_slot(started)
        try:
            answers = [self._answer(req, images.get(i), shape, started) for i, req in enumerate(reqs)]
        finally:
            self._release_slot()
        return answers if many else answers[0]

    def _shape(self) -> tuple[int, int, int]:
        config = next(iter(self._unets.values())).config
        size = config.sample_size  # an int or (H, W)
        return (int(config.in_channels), *((size, size) if isinstance(size, int) else map(int, size)))

    def _answer(self, req: dict[str, Any], image: Any, shape: tuple[int, int, int], started: float) -> Any:
        """One checked request's answer: PNGs (modes none, slerp, lerp) or the dict of edit / invert."""
        import torch

        def noise(seed: int, n: int = 1) -> Any:  # the latents of `isosweep sample --seed` / `interpolate --seeds` / `edit --seed`
            return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

        def check(progress: str) -> None:
            self._check_deadline(started, f"{progress} ({req['mode']})")

        if req["mode"] == "edit":
            with self._edit_lock:
                return run_edit(self._unet(req["device"], "edit"), self.scheduler, req, noise(req["seed"]), check, BATCH)
        if req["mode"] == "invert":
            return run_invert(self._unet(req["device"]), self.scheduler, image, req["steps"], check, BATCH)
        if req["mode"] == "none":
            x_T = noise(req["seed"], req["n"])
        else:
            frames = req["frames"]
            a, b = (noise(s).expand(frames, *shape) for s in req["seeds"])
            x_T = (slerp if req["mode"] == "slerp" else lerp)(a, b, torch.linspace(0.0, 1.0, frames))
        return [to_png(img) for img in self._ddim(self._unet(req["device"]), x_T, req["steps"], started)]


mlflow.models.set_model(DiffusersPipelineModel())
