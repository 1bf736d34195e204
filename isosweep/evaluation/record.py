"""The evaluation record: one model's numbers, and the one owner of `<checkpoint>/eval/metrics.json`.

A trial's workers write the record next to the final checkpoint (`EvalResult.write`); the sweep, the
report, `isosweep sync` and the tracking layer read it back with `read_record`. Layout:

    eval/metrics.json   {"metrics", "backbones", "rtl_curve", "frame_distances", "timings", "settings"}
    eval/<name>.png     `samples` (grid), `slerp_strip`, `lerp_strip`
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from isosweep.config import RESULT_METRICS
from isosweep.files import read_json, write_json_atomic

EVAL_DIR = "eval"
RECORD_FILE = "metrics.json"
_FIELDS = ("metrics", "backbones", "rtl_curve", "frame_distances", "timings", "settings")


@dataclass
class EvalResult:
    """One model's evaluation.

    metrics: {fid, ppl, mrtl, mcn, vor, ls, ls_rbf} (those computed). backbones: metric -> name of the
    network behind it (values with different names are not comparable). rtl_curve: RTL(t) per DDIM step,
    high noise first. images: uint8 (H, W, 3) arrays: `samples` (grid), `slerp_strip`, `lerp_strip` (the
    same pair of latents). frame_distances: {'slerp', 'lerp'}: distance between consecutive strip frames
    (network named in backbones['frame_distances']). timings: seconds per metric. settings: what
    changes the numbers (counts, steps, eps, seed, pool, t).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    backbones: dict[str, str] = field(default_factory=dict)
    rtl_curve: list[float] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    frame_distances: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def keyed_metrics(self) -> dict[str, float]:
        """Metrics keyed with their backbone, e.g. 'fid[inception-v3-clean]', for logging side by side."""
        return {f"{k}[{self.backbones.get(k, 'none')}]": v for k, v in self.metrics.items()}

    def write(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write eval/metrics.json and eval/<name>.png into a checkpoint folder; returns the eval folder."""
        out = Path(checkpoint_dir) / EVAL_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name, image in self.images.items():
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out / f"{name}.png")
        write_json_atomic(out / RECORD_FILE, {k: getattr(self, k) for k in _FIELDS})  # last: its presence means complete
        return out


def record_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / EVAL_DIR / RECORD_FILE


def read_record(checkpoint_dir: str | os.PathLike) -> EvalResult | None:
    """The record of a checkpoint folder (images left on disk: see `record_images`), or None when it has none.

    Only finite numbers of known metric names count as metrics; anything else in the file is ignored.
    """
    data = read_json(record_path(checkpoint_dir))
    if not data:
        return None
    raw = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    metrics = {k: float(v) for k, v in raw.items()
               if k in RESULT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    curve = data.get("rtl_curve")
    return EvalResult(
        metrics=metrics,
        backbones={str(k): str(v) for k, v in (data.get("backbones") or {}).items()},
        rtl_curve=[float(v) for v in curve] if isinstance(curve, list) else [],
        frame_distances=dict(data.get("frame_distances") or {}),
        timings=dict(data.get("timings") or {}),
        settings=dict(data.get("settings") or {}),
    )


def record_images(checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of the record's PNGs (`samples`, `slerp_strip`, `lerp_strip`)."""
    folder = Path(checkpoint_dir) / EVAL_DIR
    return {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}


def format_row(result: EvalResult, label: str = "model") -> str:
    """A Table-1 style block: one line per metric with its value and backbone, then the RTL(t) curve."""
    lines = [f"{'metric':<8} {'value':>12}  backbone", f"{'-' * 8} {'-' * 12}  {'-' * 20}"]
    for k in RESULT_METRICS:
        if k in result.metrics:
            lines.append(f"{k:<8} {result.metrics[k]:>12.4f}  {result.backbones.get(k, 'none')}")
    header = f"{label}: " + " | ".join(f"{k.upper()} {result.metrics[k]:.4g}" for k in RESULT_METRICS if k in result.metrics)
    out = [header, *lines]
    if result.rtl_curve:
        out.append("RTL(t): " + " ".join(f"{v:.3f}" for v in result.rtl_curve))
    return "\n".join(out)
