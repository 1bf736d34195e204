"""The served model's edit and invert modes, and the request helpers every mode shares (`pyfunc_model.py`).

The math is isosweep's own (`core.editing`, `core.inversion`, `core.sampling`): this module checks a request, prices
it in UNet evaluations and calls those functions, so a served edit or inversion equals `isosweep edit` /
`isosweep invert` for the same model and settings. It is logged with the model (`registry.SERVED_CODE`, MLflow's
`code_paths`) together with the `core` modules it imports, so a server needs no isosweep installed.

    edit    seed, steps, t, directions, gammas, iterations: the x_T of `isosweep sample --n 1 --seed S`, DDIM down to
            the first step at or below t, the top Local Basis there, x_t + gamma v drawn on for every direction (rows)
            and gamma (columns). Answer: {"images": PNGs row-major, "singular_values", "residuals", "directions",
            "gammas", "edit_timestep"}.
    invert  image (a PNG of the model's size, base64), steps: DDIM inversion to x_T and the redraw from it. Answer:
            {"x_T": floats (C*H*W, row-major), "x_T_shape": [C, H, W], "reconstruction": PNG, "reconstruction_mse"}.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, Callable

import numpy as np
import torch
from mlflow.exceptions import MlflowException

from isosweep.core.editing import ddim_steps, edit_step_index, edited_states, unet_local_basis
from isosweep.core.inversion import ddim_invert
from isosweep.core.sampling import ddim_sample, ddim_scheduler

EDIT_DEFAULTS: dict[str, Any] = {"t": 500, "directions": [0], "gammas": [-8.0, 0.0, 8.0], "iterations": 8}
INVERT_DEFAULTS: dict[str, Any] = {"image": ""}
MAX_DIRECTION = 15  # the largest direction index: the basis of 16 + OVERSAMPLE copies of x_t bounds an edit's memory
MAX_ITERATIONS = 100  # subspace-iteration rounds of the Local Basis (the CLI's default is 8)
OVERSAMPLE = 4  # core.editing.local_basis's default: vectors = directions asked for + 4
MAX_PNG_BYTES = 4 * 2**20  # an invert request's PNG, decoded from base64


def bad(message: str) -> MlflowException:
    """A refused request: INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server)."""
    return MlflowException.invalid_parameter_value(message)


def scalar(name: str, value: Any) -> Any:
    """One value from a plain value, a list or array of one (the JSON `inputs` form gives 0-d arrays)."""
    arr = np.asarray(value, dtype=object)
    if arr.size != 1:
        raise bad(f"'{name}' must be a single value, got {value!r}")
    out = arr.reshape(-1)[0]
    return out.item() if isinstance(out, np.generic) else out


def integer(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise bad(f"'{name}' must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def values(name: str, value: Any, kind: Callable[[str, Any], Any]) -> list:
    """A list of values from a plain value, a list or an array (one value stands for a list of one)."""
    return [kind(name, v.item() if isinstance(v, np.generic) else v) for v in np.asarray(value, dtype=object).reshape(-1).tolist()]


def number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise bad(f"'{name}' must hold finite numbers, got {value!r}")
    return float(value)


def to_png(image: np.ndarray) -> bytes:
    """One uint8 image (H, W, C), C in {1, 3, 4} -> PNG bytes (L, RGB or RGBA)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), as isosweep.data.images.to_uint8."""
    x = x.float().clamp(-1, 1).cpu().numpy().astype(np.float64)
    return ((x + 1.0) / 2.0 * 255.0).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def check_edit(req: dict[str, Any], max_images: int) -> None:
    """The edit fields of a request, in place: t, iterations whole; directions, gammas lists; each within its bound."""
    req["t"], req["iterations"] = integer("t", req["t"]), integer("iterations", req["iterations"])
    req["directions"] = values("directions", req["directions"], integer)
    req["gammas"] = values("gammas", req["gammas"], number)
    if req["t"] < 0:
        raise bad(f"'t' must be a timestep >= 0, got {req['t']}")
    if not 1 <= req["iterations"] <= MAX_ITERATIONS:
        raise bad(f"'iterations' must be in 1..{MAX_ITERATIONS}, got {req['iterations']}")
    if not req["directions"] or not all(0 <= d <= MAX_DIRECTION for d in req["directions"]):
        raise bad(f"'directions' must be indices 0..{MAX_DIRECTION} of the Local Basis (0: the largest), got {req['directions']}")
    if not req["gammas"] or len(req["directions"]) * len(req["gammas"]) > max_images:
        raise bad(f"'directions' x 'gammas' must be 1..{max_images} images (the most images one request may ask for), "
                  f"got {len(req['directions'])} x {len(req['gammas'])}")


def edit_cost(req: dict[str, Any], scheduler) -> tuple[str, int]:
    """An edit's UNet evaluations: 1 image down to the edit step, directions x gammas + 1 images on from it, and the
    basis's (iterations + 2) rounds over directions + OVERSAMPLE vectors (two more rounds: Rayleigh-Ritz, residuals).
    Refuses a t below the schedule's last step."""
    timesteps = [int(t) for t in ddim_scheduler(scheduler, req["steps"]).timesteps]
    try:
        at = edit_step_index(timesteps, req["t"])
    except ValueError as exc:
        raise bad(f"'t': {exc}") from None
    images = 1 + len(req["directions"]) * len(req["gammas"])
    vectors = max(req["directions"]) + 1 + OVERSAMPLE
    cost = at + images * (len(timesteps) - at) + (req["iterations"] + 2) * vectors
    return (f"{at} steps to t + images={images} x {len(timesteps) - at} steps from t + "
            f"(iterations={req['iterations']} + 2) x vectors={vectors}"), cost


def run_edit(unet: torch.nn.Module, scheduler, req: dict[str, Any], x_T: torch.Tensor, check: Callable[[str], None],
             batch: int) -> dict[str, Any]:
    """The edit of one x_T (1, C, H, W) by core.editing; `check(progress)` between steps stops a late request."""
    ddim = ddim_scheduler(scheduler, req["steps"])
    timesteps = [int(t) for t in ddim.timesteps]
    try:
        at = edit_step_index(timesteps, req["t"])
    except ValueError as exc:
        raise bad(f"'t': {exc}") from None
    k = max(req["directions"]) + 1
    if k > x_T[0].numel():
        raise bad(f"'directions': this model's X has {x_T[0].numel()} dimensions; ask for smaller indices")
    x = x_T.to(next(unet.parameters()).device)
    for i in range(at):  # one step per call: the same steps as one call over timesteps[:at]
        check(f"{i} of {at} DDIM steps to t")
        x = ddim_steps(unet, ddim, x, timesteps[i : i + 1])
    check("the steps to t")
    basis = unet_local_basis(unet, x, timesteps[at], k, iterations=req["iterations"], oversample=OVERSAMPLE)
    states = torch.cat([x, edited_states(x, basis.directions[req["directions"]], torch.tensor(req["gammas"]))])
    drawn = []
    for lo in range(0, len(states), batch):
        chunk = states[lo : lo + batch]
        for i, t in enumerate(timesteps[at:]):
            check(f"the Local Basis and {i} of {len(timesteps) - at} DDIM steps on edits {lo + 1}-{lo + len(chunk)} of {len(states)}")
            chunk = ddim_steps(unet, ddim, chunk, [t])
        drawn.append(chunk)
    images = to_uint8(torch.cat(drawn)[1:])  # the first is the unedited x_t, drawn with them as `isosweep edit` does
    return {"images": [to_png(img) for img in images], "singular_values": basis.singular_values.double().cpu().tolist(),
            "residuals": basis.residuals.double().cpu().tolist(), "directions": req["directions"], "gammas": req["gammas"],
            "edit_timestep": timesteps[at]}


def read_png(text: Any, shape: tuple[int, int, int]) -> torch.Tensor:
    """The base64 PNG of an invert request as an image (1, C, H, W) in [-1, 1]; refused unless it is a PNG of the
    model's size (C, H, W) and at most MAX_PNG_BYTES."""
    from PIL import Image

    channels, height, width = shape
    need = f"a base64 PNG of this model's size {width}x{height}, at most {MAX_PNG_BYTES // 2**20} MiB"
    if not isinstance(text, str) or not text:
        raise bad(f"'image' must be {need}; got {type(text).__name__ if text != '' else 'nothing'}")
    if len(text) > (MAX_PNG_BYTES + 2) // 3 * 4 + len(text) // 76 + 4:  # base64 of the largest PNG, line breaks allowed
        raise bad(f"'image' must be {need}; got {len(text)} characters of base64")
    try:
        data = base64.b64decode(text)
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before the pixels are decoded
        if img.format != "PNG":
            raise ValueError(f"a {img.format} image")
    except (binascii.Error, ValueError, OSError) as exc:
        raise bad(f"'image' must be {need}; it is not one ({str(exc)[:200]})") from None
    if len(data) > MAX_PNG_BYTES or img.size != (width, height):
        raise bad(f"'image' must be {need}; got {img.size[0]}x{img.size[1]}, {len(data)} bytes")
    if img.mode in ("RGBA", "LA", "P"):  # transparency over white, as the training images load
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32).reshape(height, width, -1)
    if arr.shape[-1] != channels:
        raise bad(f"'image': this model draws {channels}-channel images; send a greyscale or RGB PNG")
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)


def run_invert(unet: torch.nn.Module, scheduler, image: torch.Tensor, steps: int, check: Callable[[str], None],
               batch: int) -> dict[str, Any]:
    """DDIM inversion of one image (1, C, H, W) to x_T and its redraw, by core.inversion and core.sampling."""
    check("0 of 2 stages (inversion, redraw)")
    x_T = ddim_invert(unet, scheduler, image, steps, batch_size=batch, progress=False)
    check("1 of 2 stages (inversion, redraw)")
    redrawn = ddim_sample(unet, scheduler, x_T, steps, batch_size=batch, progress=False).images
    mse = float(((redrawn.double() - image.double()) ** 2).mean())
    return {"x_T": x_T[0].double().flatten().tolist(), "x_T_shape": list(x_T.shape[1:]), "reconstruction": to_png(to_uint8(redrawn)[0]),
            "reconstruction_mse": mse}
