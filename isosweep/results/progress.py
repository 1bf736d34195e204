"""How far a running trial has got, from its checkpoints in storage: the step and total steps each checkpoint's
manifest records (plain JSON), and an estimate of when training ends from the pace between the two newest.
No Ray, torch or MLflow, so `isosweep status` stays a quick poll from any machine that reads the storage."""

from __future__ import annotations

import time
from dataclasses import dataclass

from isosweep import storage as st
from isosweep.files import MANIFEST
from isosweep.results.layout import TRAIN_DIR


@dataclass(frozen=True)
class TrialProgress:
    step: int
    max_steps: int | None  # None for a checkpoint written before manifests recorded it
    saved_at: float  # when the newest checkpoint's manifest was written (seconds since the epoch)
    eta_s: float | None  # seconds until training ends (evaluation not included); None without a pace to go by

    def line(self, now: float) -> str:
        total = f"/{self.max_steps}" if self.max_steps else ""
        eta = f", training ends in about {_duration(self.eta_s)}" if self.eta_s is not None else ""
        return f"step {self.step}{total} (checkpoint {_duration(max(0.0, now - self.saved_at))} ago){eta}"


def trial_progress(sweep: str, trial_id: str, now: float | None = None) -> TrialProgress | None:
    """The progress of one trial from `<sweep>/train/<trial id>/checkpoint_*/manifest.json`; None before its first
    checkpoint. A manifest being written or unreadable is skipped."""
    now = time.time() if now is None else now
    points = []
    folder = st.join(sweep, TRAIN_DIR, trial_id)
    for name in st.list_dirs(folder):
        uri = st.join(folder, name, MANIFEST)
        try:
            manifest = st.read_json(uri) or {}
        except ValueError:
            continue
        step, at = manifest.get("step"), st.modified(uri)
        if isinstance(step, int) and at is not None:
            total = manifest.get("max_steps")
            points.append((step, at, total if isinstance(total, int) else None))
    if not points:
        return None
    points.sort()
    step, at, total = points[-1]
    eta = None
    if total and len(points) > 1:
        before_step, before_at, _ = points[-2]
        if step > before_step and at > before_at:
            pace = (step - before_step) / (at - before_at)  # steps per second between the two newest checkpoints
            eta = max(0.0, (total - step) / pace - (now - at))
    return TrialProgress(step, total, at, eta)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
