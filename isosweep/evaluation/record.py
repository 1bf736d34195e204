"""The evaluation record: one model's numbers, and the one owner of `<checkpoint>/eval/metrics.json`.

A trial's workers write the record next to the final checkpoint (`EvalResult.write`); the sweep, the
report, `isosweep sync` and the tracking layer read it back with `read_record`. Layout:

    eval/metrics.json   {"metrics", "backbones", "rtl_curve", "frame_distances", "timings", "settings"}
    eval/<name>.png     `samples` (grid), `slerp_strip`, `lerp_strip`
    eval/<name>.npy     the per-unit values behind a metric, in unit order (float64, plain .npy, never pickled):
                        `ppl_pairs` (d_i of every PPL pair, unfiltered), `mrtl_pairs` (each pair's mean RTL over t),
                        `mcn_samples` / `mcn_t<t>_samples` (sigma_max / sigma_min of every Jacobian sample)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from isosweep.files import read_json, write_json_atomic
from isosweep.spec import RESULT_METRICS, base_metric, is_result_metric

EVAL_DIR = "eval"
RECORD_FILE = "metrics.json"
_FIELDS = ("metrics", "backbones", "rtl_curve", "frame_distances", "timings", "settings")


@dataclass
class EvalResult:
    """One model's evaluation.

    metrics: the RESULT_METRICS computed (fid, ppl, mrtl, mcn, vor, ls, ...). backbones: metric -> name of the
    network behind it (values with different names are not comparable). rtl_curve: RTL(t) per DDIM step,
    high noise first. images: uint8 (H, W, 3) arrays: `samples` (grid), `slerp_strip`, `lerp_strip` (the
    same pair of latents). frame_distances: {'slerp', 'lerp'}: distance between consecutive strip frames
    (network named in backbones['frame_distances']). timings: seconds per metric. settings: what
    changes the numbers (counts, steps, eps, seed, pool, t, bootstrap, `tf32`). values: name -> the per-unit
    values (n,) a metric and its interval were computed from (`ppl_pairs`, `mrtl_pairs`, `mcn_samples`, ...).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    backbones: dict[str, str] = field(default_factory=dict)
    rtl_curve: list[float] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    frame_distances: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def keyed_metrics(self) -> dict[str, float]:
        """Metrics keyed with their backbone, e.g. 'fid[inception-v3-clean]', for logging side by side (an interval
        bound or a further timestep has its metric's backbone: 'ppl_hi[lpips-alex-v0.1]')."""
        return {f"{k}[{self.backbones.get(k) or self.backbones.get(base_metric(k), 'none')}]": v for k, v in self.metrics.items()}

    def write(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write eval/metrics.json and eval/<name>.png into a checkpoint folder; returns the eval folder."""
        out = Path(checkpoint_dir) / EVAL_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name, image in self.images.items():
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out / f"{name}.png")
        for name, values in self.values.items():
            np.save(out / f"{name}.npy", np.asarray(values, dtype=np.float64), allow_pickle=False)
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
               if is_result_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    curve = data.get("rtl_curve")
    return EvalResult(
        metrics=metrics,
        backbones={str(k): str(v) for k, v in (data.get("backbones") or {}).items()},
        rtl_curve=[float(v) for v in curve] if isinstance(curve, list) else [],
        frame_distances=dict(data.get("frame_distances") or {}),
        timings=dict(data.get("timings") or {}),
        settings=dict(data.get("settings") or {}),
    )


def record_values(checkpoint_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: (n,) float64} of the record's per-unit values (`ppl_pairs`, ...); {} when it has none. Loaded
    without pickle: a file that is not a plain numeric array is skipped."""
    folder = Path(checkpoint_dir) / EVAL_DIR
    out = {}
    for p in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        try:
            out[p.stem] = np.load(p, allow_pickle=False).astype(np.float64).reshape(-1)
        except (ValueError, OSError):
            continue
    return out


def record_images(checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of the record's PNGs (`samples`, `slerp_strip`, `lerp_strip`, and `edit_grid` with the edit metrics,
    `inversion_strip` with the inversion ones)."""
    folder = Path(checkpoint_dir) / EVAL_DIR
    return {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}


def metric_text(values: dict, name: str, digits: int = 4) -> str:
    """A metric as a reader sees it: `12.3 [11.1, 13.6]` when its bootstrap bounds <name>_lo/_hi are finite in
    `values` (a record's metrics or a results row), else `12.3`; `-` when the value is missing or NaN."""

    def num(key: str) -> float | None:
        v = values.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        return float(v) if ok else None

    v, lo, hi = num(name), num(f"{name}_lo"), num(f"{name}_hi")
    if v is None:
        return "-"
    return f"{v:.{digits}g}" + (f" [{lo:.{digits}g}, {hi:.{digits}g}]" if lo is not None and hi is not None else "")


def shown_metrics(names) -> list[str]:
    """The metrics worth a line or a column of their own, in order: every name except interval bounds (shown
    beside their metric by `metric_text`)."""
    return [k for k in names if not k.endswith(("_lo", "_hi"))]


def format_row(result: EvalResult, label: str = "model") -> str:
    """A Table-1 style block: one line per metric with its value, its interval and backbone, then the RTL(t) curve."""
    names = shown_metrics([*RESULT_METRICS, *sorted(k for k in result.metrics if k not in RESULT_METRICS)])
    names = [k for k in names if k in result.metrics]
    lines = [f"{'metric':<10} {'value [bootstrap interval]':>34}  backbone", f"{'-' * 10} {'-' * 34}  {'-' * 20}"]
    for k in names:
        backbone = result.backbones.get(k) or result.backbones.get(base_metric(k), "none")
        lines.append(f"{k:<10} {metric_text(result.metrics, k, 5):>34}  {backbone}")
    header = f"{label}: " + " | ".join(f"{k.upper()} {metric_text(result.metrics, k)}" for k in names if base_metric(k) == k)
    out = [header, *lines]
    if result.rtl_curve:
        out.append("RTL(t): " + " ".join(f"{v:.3f}" for v in result.rtl_curve))
    return "\n".join(out)
