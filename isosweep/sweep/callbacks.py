"""Tune and Train callbacks: per-trial progress lines with the sweep's ETA, the sweep's Ray metrics, and
Train reports forwarded to Tune."""

from __future__ import annotations

import math
import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from isosweep import storage as st
from isosweep.console import say, warn
from isosweep.redact import scrub_text
from isosweep.results.layout import TRIALS_FILE, TUNER_FILE
from isosweep.results.readback import trial_record
from isosweep.results.seal import add_seals, is_tune_state, read_seals, seal_stored, state_key, write_seals
from isosweep.sweep.monitoring import SweepMetrics


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


def trial_state(trial, done: set[str] = frozenset(), failed: set[str] = frozenset()) -> str:
    """A Tune trial's state among `monitoring.TRIAL_STATES`: TERMINATED is done, ERROR failed, RUNNING running,
    anything else pending. `done`/`failed`: trial ids that just ended, in case Tune has not set their status yet."""
    if trial.trial_id in failed or trial.status == "ERROR":
        return "failed"
    if trial.trial_id in done or trial.status == "TERMINATED":
        return "done"
    return "running" if trial.status == "RUNNING" else "pending"


def trial_counts(states: list[str], planned: int) -> dict[str, int]:
    """Trials by state; pending is whatever the plan has left (queued, paused, or not yet suggested)."""
    counts = {state: states.count(state) for state in ("running", "done", "failed")}
    counts["pending"] = max(0, planned - sum(counts.values()))
    return counts


class SweepProgress(Callback):
    """Prints one line per finished trial (how many are done, about how long is left) and, given
    `metrics`, keeps the sweep's Ray metrics up to date (at every trial event, and every few seconds)."""

    PUBLISH_EVERY_S = 2.0
    # `isosweep resume` restores this callback pickled by the version that started the sweep: attributes that
    # version may lack have class-level defaults
    metrics: SweepMetrics | None = None
    _published = 0.0

    def __init__(self, total: int, concurrency: int, metrics: SweepMetrics | None = None) -> None:
        self.total, self.concurrency, self.metrics = total, concurrency, metrics
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.done = 0
        self._ended: dict[str, set[str]] = {"done": set(), "failed": set()}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())
        self._publish(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial, "finished")
        self._publish(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, "failed")
        self._publish(trials)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self._published >= self.PUBLISH_EVERY_S:
            self._publish(trials)

    def on_experiment_end(self, trials, **info):
        self._publish(trials)

    def _finished(self, trial, how: str) -> None:
        now = time.time()
        self.done += 1
        if "_ended" not in self.__dict__:  # restored from an older version (see the class attributes)
            self._ended = {"done": set(), "failed": set()}
        self._ended["done" if how == "finished" else "failed"].add(trial.trial_id)
        if trial.trial_id in self.started:
            self.durations.append(now - self.started.pop(trial.trial_id))
        eta = sweep_eta(self.durations, list(self.started.values()), self.total - self.done, self.concurrency, now)
        left = ""
        if eta is not None and self.done < self.total:
            left = f"; about {eta / 60:.0f} min left" if eta >= 90 else f"; about {eta:.0f} s left"
        say(f"trial {trial.trial_id} {how} ({self.done}/{self.total} done{left})")

    def _publish(self, trials) -> None:
        """The sweep's gauges from Tune's trials (a resumed sweep's restored trials count too)."""
        if self.metrics is None:
            return
        now = self._published = time.time()
        ended = self.__dict__.get("_ended", {"done": set(), "failed": set()})
        states = [trial_state(t, ended["done"], ended["failed"]) for t in trials]
        counts = trial_counts(states, self.total)
        remaining = counts["pending"] + counts["running"]
        eta = 0.0 if remaining == 0 else sweep_eta(self.durations, list(self.started.values()), remaining, self.concurrency, now)
        finished = [(t.trial_id, bool((t.config or {}).get("baseline")), dict(t.last_result or {}))
                    for t, state in zip(trials, states) if state == "done"]
        self.metrics.publish(counts, finished, eta)


# The sweep URIs of this driver process by their scrubbed text: the callbacks below are pickled into tuner.pkl with the
# scrubbed URI only (no credential goes to storage), and a restored one finds its URI here again (`attach`).
_DRIVER_URIS: dict[str, str] = {}


def attach(sweep_uri: str) -> None:
    """Lets the callbacks of this sweep (new or restored from tuner.pkl) write to `sweep_uri`, credentials included."""
    _DRIVER_URIS[scrub_text(sweep_uri)] = sweep_uri


class _WritesToSweep(Callback):
    """A driver callback writing into the sweep's folder; pickled with the URI scrubbed."""

    def __init__(self, sweep_uri: str) -> None:
        attach(sweep_uri)
        self.sweep_uri = scrub_text(sweep_uri)

    @property
    def uri(self) -> str:
        return _DRIVER_URIS.get(self.sweep_uri, self.sweep_uri)


class TrialRecords(_WritesToSweep):
    """Writes every trial's config, last result and status to `<sweep>/isosweep_trials.records` (plain JSON) at each
    trial event, so `isosweep results`/`status` read the sweep without Tune's pickled experiment state."""

    def __init__(self, sweep_uri: str) -> None:
        super().__init__(sweep_uri)
        self._ended: dict[str, set[str]] = {"done": set(), "failed": set()}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("evaluated"):  # the final report: training reports change no row
            self._write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended["done"].add(trial.trial_id)
        self._write(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended["failed"].add(trial.trial_id)
        self._write(trials)

    def on_experiment_end(self, trials, **info):
        self._write(trials)

    def _write(self, trials) -> None:
        status = {"done": "TERMINATED", "failed": "ERROR", "running": "RUNNING", "pending": "PENDING"}
        records = [trial_record(t.trial_id, dict(t.config or {}), dict(t.last_result or {}),
                                status[trial_state(t, self._ended["done"], self._ended["failed"])]) for t in trials]
        uri = st.join(self.uri, TRIALS_FILE)
        try:
            st.write_json(uri, {"trials": records})
        except OSError as exc:  # storage down: the next event writes them all again
            warn(f"could not record the trials at {scrub_text(uri)}: {scrub_text(str(exc))}")


class StateSeal(_WritesToSweep):
    """Seals Tune's state files as this driver writes them (`results.seal`): tuner.pkl when the run starts, then every
    few seconds and at the end the files of the driver's staging folder (what Tune uploads to the sweep) are given
    their HMAC, kept in storage beside them. Holds no key (it is pickled into tuner.pkl): the key is read where it is used."""

    EVERY_S = 5.0
    _seals: dict | None = None  # loaded from storage on first use (and after a restore)
    _sealed_at = 0.0

    def __getstate__(self):
        return {"sweep_uri": self.sweep_uri}

    def setup(self, **info):
        """tuner.pkl, as `Tuner()` wrote it just before this run (or as the resume checked, or was told to trust, it)."""
        try:
            seal_stored(self.uri, [TUNER_FILE])
        except OSError as exc:
            warn(f"could not seal {TUNER_FILE} at {self.sweep_uri}: {scrub_text(str(exc))}")

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self._sealed_at >= self.EVERY_S:
            self._seal(trials)

    def on_experiment_end(self, trials, **info):  # after Tune's last upload of its state
        self._seal(trials)

    def _seal(self, trials) -> None:
        self._sealed_at = time.time()
        if not trials:
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        files = {p.name: p.read_bytes() for p in staging.iterdir() if p.is_file() and is_tune_state(p.name)}
        if self._seals is None:
            self._seals = read_seals(self.uri)
        try:
            if add_seals(self._seals, files, state_key()):
                write_seals(self.uri, self._seals)
        except OSError as exc:  # storage down: sealed at the next tick; a resume before then asks for --trust-storage
            warn(f"could not seal the sweep's Tune state at {self.sweep_uri}: {scrub_text(str(exc))}")


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
