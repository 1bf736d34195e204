"""Tune and Train callbacks: per-trial progress lines with the sweep's ETA, and Train reports forwarded to Tune."""

from __future__ import annotations

import math
import time

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from isosweep.console import say


def sweep_eta(durations: list[float], running_since: list[float], remaining: int, concurrency: int, now: float) -> float | None:
    """Seconds until the sweep ends, from the mean finished-trial duration; None before any trial ends.

    Trials still running are assumed to need the mean duration in total; queued ones run
    `concurrency` at a time after them.
    """
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    running_left = max((max(0.0, mean - (now - t)) for t in running_since), default=0.0)
    queued = max(0, remaining - len(running_since))
    return running_left + math.ceil(queued / max(1, concurrency)) * mean


class SweepProgress(Callback):
    """Prints one line per finished trial: how many are done and about how long is left."""

    def __init__(self, total: int, concurrency: int) -> None:
        self.total, self.concurrency = total, concurrency
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.done = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, "failed")

    def _finished(self, trial, how: str) -> None:
        now = time.time()
        self.done += 1
        if trial.trial_id in self.started:
            self.durations.append(now - self.started.pop(trial.trial_id))
        eta = sweep_eta(self.durations, list(self.started.values()), self.total - self.done, self.concurrency, now)
        left = ""
        if eta is not None and self.done < self.total:
            left = f"; about {eta / 60:.0f} min left" if eta >= 90 else f"; about {eta:.0f} s left"
        say(f"trial {trial.trial_id} {how} ({self.done}/{self.total} done{left})")


class ForwardToTune(TuneReportCallback):
    """Forwards each Train report to Tune (live per-trial status in the Tune table and dashboard).

    Two-objective searchers need every Tune result to carry both objectives, so training reports
    carry NaN placeholders until the final, evaluated report.
    """

    def __init__(self, objectives: list[str]) -> None:
        super().__init__()
        self.objectives = list(objectives)

    def after_report(self, run_context, metrics, checkpoint):
        filled = [{**{o: float("nan") for o in self.objectives}, **m} for m in metrics]
        super().after_report(run_context, filled, checkpoint)
