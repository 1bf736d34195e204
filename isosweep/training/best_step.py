"""Checkpoint selection by a cheap FID (`evaluation.checkpoint_fid`): the paper trains "until it achieves the
lowest FID", so the trial's model is the EMA weights of the step with the lowest cheap FID, not the last step's.

Every `every` optimizer steps and at the last step, the loop scores the EMA weights with the `Scorer` it is
handed (`evaluation.suite.checkpoint_fid_scorer`: the final FID's backbone, reference statistics and latents,
fewer samples and DDIM steps). The lowest finite score wins, the earliest step on ties. Its weights are
evaluated in full at the end and saved as the final checkpoint's pipeline. Every checkpoint keeps

    selection.json   the curve so far, the selected step and its score, the backbone, the settings (JSON)
    best/            the selected EMA UNet so far: config.json + diffusion_pytorch_model.safetensors

both listed in its manifest, so a run resumed from any checkpoint keeps its choice even after Ray Train has
deleted the checkpoint of the selected step (it keeps the last three). Nothing here is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from isosweep.console import say
from isosweep.core.names import CHEAP_FID, SELECTED_FID, SELECTED_STEP
from isosweep.files import read_json

if TYPE_CHECKING:  # a type only: the trial process reads a checkpoint's selection without loading diffusers
    from diffusers import UNet2DModel

SELECTION_FILE = "selection.json"
BEST_DIR = "best"
BEST_WEIGHTS = f"{BEST_DIR}/diffusion_pytorch_model.safetensors"  # diffusers' name: best/ loads with from_pretrained
FORMAT = "isosweep-selection/1"

# scorer(ema_unet, scheduler, device, rank, world_size, codec=...) -> (cheap FID, backbone name); every rank calls it;
# codec: a latent model's autoencoder (`core.codec.Codec`), None for a pixel-space model
Scorer = Callable[["UNet2DModel", Any, torch.device, int, int], tuple[float, str]]


@dataclass
class Selection:
    """The cheap-FID curve of one run and its best step so far (the same on every rank)."""

    every: int  # optimizer steps between scores; the last step is always scored
    settings: dict[str, Any]  # what changes the score's value: samples, DDIM steps, seed, reference images
    curve: list[list[Any]] = field(default_factory=list)  # [step, value] in step order
    backbone: str = ""
    best_step: int | None = None
    best_value: float = math.nan
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU

    @classmethod
    def of(cls, spec) -> "Selection | None":
        """The selection a spec asks for, or None when evaluation.checkpoint_fid.every is 0 or null."""
        ev = spec.evaluation
        every = ev.checkpoint_fid.every
        if not every:
            return None
        return cls(every=every, settings={"num_samples": ev.checkpoint_fid.num_samples, "ddim_steps": ev.checkpoint_fid.ddim_steps,
                                          "seed": ev.seed, "reference_samples": ev.fid.reference_samples, "backbone": ev.backbone})

    def due(self, step: int, final: bool) -> bool:
        return final or step % self.every == 0

    def score(self, scorer: Scorer, ema_unet: UNet2DModel, scheduler, device: torch.device, rank: int,
              world_size: int, step: int, codec=None) -> dict[str, Any]:
        """Score the EMA weights at `step`, keep them when they beat the best so far; the metrics to report."""
        value, backbone = scorer(ema_unet, scheduler, device, rank, world_size, codec=codec)
        value = float(value)
        if self.backbone and backbone != self.backbone:  # a score never silently changes meaning
            raise ValueError(f"the cheap FID's backbone changed from {self.backbone} to {backbone} at step {step}; "
                             "scores of two feature networks cannot be compared")
        self.backbone = backbone
        self.curve = [p for p in self.curve if p[0] < step] + [[step, value]]
        if math.isfinite(value) and (self.best_step is None or value < self.best_value):
            self.best_step, self.best_value = step, value
            self.best_weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ema_unet.state_dict().items()}
        return {CHEAP_FID: value, f"backbone_{CHEAP_FID}": backbone}

    def selected(self, ema_unet: UNet2DModel) -> UNet2DModel:
        """The trial's model: `ema_unet` holding the best step's weights (itself when no score was finite)."""
        if self.best_weights is not None:
            ema_unet.load_state_dict(self.best_weights)
        return ema_unet

    def summary(self) -> dict[str, Any]:
        """The selected step and its cheap FID (NaN and -1 when no score was finite)."""
        return {SELECTED_STEP: -1 if self.best_step is None else self.best_step, SELECTED_FID: self.best_value}

    def write(self, directory: Path, template: UNet2DModel) -> None:
        """selection.json and best/ (the weights, with `template`'s config) into a checkpoint folder being written."""
        if self.best_weights is not None:
            (directory / BEST_DIR).mkdir()
            template.save_config(directory / BEST_DIR)
            save_file(self.best_weights, str(directory / BEST_WEIGHTS))
        record = {"format": FORMAT, "metric": CHEAP_FID, "backbone": self.backbone, "every": self.every,
                  "settings": self.settings, "curve": [[s, _json_float(v)] for s, v in self.curve],
                  SELECTED_STEP: self.best_step, SELECTED_FID: _json_float(self.best_value),
                  "best_weights": BEST_WEIGHTS if self.best_weights is not None else None}
        (directory / SELECTION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))

    def restore(self, saved: dict[str, Any] | None, *, verbose: bool) -> None:
        """Continue the curve and the choice a checkpoint saved (`read_saved`), when it was scored the same way."""
        if not saved:
            return
        record = saved["record"]
        if record.get("settings") != self.settings:
            if verbose:
                say(f"the checkpoint's cheap FID was computed with {record.get('settings')}, this run's with "
                    f"{self.settings}: its curve and selected step are not comparable and are dropped")
            return
        self.backbone = str(record.get("backbone") or "")
        self.curve = [[int(s), math.nan if v is None else float(v)] for s, v in record.get("curve", [])]
        if record.get(SELECTED_STEP) is not None and saved.get("best_weights") is not None:
            self.best_step, self.best_value = int(record[SELECTED_STEP]), float(record[SELECTED_FID])
            self.best_weights = saved["best_weights"]


def read_saved(checkpoint_dir: Path, listed: Collection[str]) -> dict[str, Any] | None:
    """What a verified checkpoint folder kept of its selection: {"record": selection.json, "best_weights": state
    dict or None}, or None when it has no selection.json. `listed`: the files its manifest lists (and verified);
    ValueError when the record names best weights the manifest does not list."""
    if SELECTION_FILE not in listed:
        return None
    record = json.loads((checkpoint_dir / SELECTION_FILE).read_text())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{SELECTION_FILE} is not an isosweep selection record ({FORMAT})")
    weights = None
    if record.get("best_weights"):
        if record["best_weights"] != BEST_WEIGHTS or BEST_WEIGHTS not in listed:
            raise ValueError(f"{SELECTION_FILE} names best weights {record['best_weights']!r} that the manifest does not list")
        try:
            weights = load_file(str(checkpoint_dir / BEST_WEIGHTS), device="cpu")  # safetensors: tensors only, no code
        except SafetensorError as exc:
            raise ValueError(f"{BEST_WEIGHTS} cannot be read: {exc}") from None
    return {"record": record, "best_weights": weights}


def selection_columns(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The row's view of a final checkpoint's selection: selected_step, selected_fid_cheap and
    backbone_fid_cheap; {} when the trial selected nothing (evaluation.checkpoint_fid off)."""
    record = read_json(Path(checkpoint_dir) / SELECTION_FILE)
    if not record or record.get(SELECTED_STEP) is None:
        return {}
    value = record.get(SELECTED_FID)
    return {SELECTED_STEP: int(record[SELECTED_STEP]), SELECTED_FID: math.nan if value is None else float(value),
            f"backbone_{CHEAP_FID}": str(record.get("backbone", ""))}


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
