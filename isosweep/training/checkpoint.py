"""A trial's checkpoint folder: the EMA model as a diffusers pipeline, the training state, the resolved spec.

    model_index.json, unet/, scheduler/   the EMA UNet + scheduler: `DDPMPipeline.from_pretrained(dir)`
    train_state.pt                        raw weights, optimizer, EMA, GradScaler, step, epoch, data
                                          position, RNG states: what resume needs
    spec.json                             the resolved spec and the trial parameters
    eval/                                 (final checkpoint, when evaluated) the evaluation record

`train_state.pt` holds tensors and plain Python values only (the RNG states too), so it is read back
with `torch.load(weights_only=True)`: a checkpoint from storage can never run code when loaded.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, UNet2DModel

from isosweep.core.ema import EMA

TRAIN_STATE = "train_state.pt"


def save_checkpoint(directory: Path, unet: UNet2DModel, ema: EMA, scheduler, state: dict[str, Any], spec_json: dict[str, Any]) -> Path:
    """Write the EMA UNet + scheduler as a DDPMPipeline directory, train_state.pt and spec.json."""
    ema_unet = ema.copy_to(copy.deepcopy(unet)).to("cpu").eval()
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(directory)
    torch.save(state, directory / TRAIN_STATE)
    (directory / "spec.json").write_text(json.dumps(spec_json, indent=2, sort_keys=True))
    return directory


def load_train_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint folder, loaded without unpickling any code."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint (no {TRAIN_STATE}); resume needs a checkpoint written by isosweep train")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds objects other than tensors and plain values, so it is not loaded (loading "
                         f"could run code): {str(exc).splitlines()[0]}; fix: resume from a checkpoint written by this "
                         "version of isosweep") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain values (no NumPy objects: weights_only loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": _python_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
