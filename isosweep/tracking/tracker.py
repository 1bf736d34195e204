"""One MLflow tracking store, as the rest of isosweep sees it: the URI, the retries and the best-effort rule.

A sweep, a trial and the commands hold a `Tracker` instead of threading a tracking URI through their
helpers. Every call retries transient failures (`client.retry_call`); `best_effort` is the one place
that decides what a tracking failure off the critical path becomes: a warning that says where the
data is safe, never an error that fails trained work. The functions of `runs`, `artifacts`,
`registry` and `sync` stay the URI-first building blocks (and are tested as such); this is their door.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from isosweep.console import say, warn
from isosweep.redact import scrub_text
from isosweep.tracking import artifacts, registry, runs, sync
from isosweep.tracking.client import TrackingError, TrackingStop, client, refusal, resolve_tracking_uri, retry_call, tags_of

T = TypeVar("T")


class Tracker:
    """The tracking store at `uri` (an MLflow tracking URI; it may carry credentials, so it is never logged
    unscrubbed and never stored with a sweep). A refusal met by `best_effort` (an expired token, a deleted run)
    stops it for good (`stop`): its later best-effort calls and `end_run` do nothing. scope and sync_target: whose
    tracking that stops and what `isosweep sync` records it from, for the warning (`client.TrackingStop`)."""

    def __init__(self, uri: str, scope: str = "the sweep", sync_target: str | None = None) -> None:
        self.uri = uri
        self.stop = TrackingStop(uri, scope, sync_target)

    @property
    def stopped(self) -> bool:
        return self.stop.kind is not None

    @classmethod
    def resolve(cls, cli_uri: str | None, spec_uri: str | None, storage: str | os.PathLike | None) -> Tracker:
        """--tracking-uri, the spec's `tracking.uri`, MLFLOW_TRACKING_URI, else the local SQLite store
        beside the storage (`client.resolve_tracking_uri`)."""
        return cls(resolve_tracking_uri(spec_uri, cli_uri, storage))

    def __repr__(self) -> str:
        return f"Tracker({scrub_text(self.uri)!r})"

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) under the retry policy; `TrackingError` naming `what` when it runs out."""
        return retry_call(what, self.uri, fn, *args, **kwargs)

    def best_effort(self, what: str, safe: str, fn: Callable[..., T], *args: Any, ok: Any = None, **kwargs: Any) -> T | None:
        """fn(*args, **kwargs), or None after a `TrackingError`, said as one warning line: `what` failed, and
        `safe` says where the data is meanwhile. `ok` is returned for a None result (to tell success apart).
        A refusal (401/403, a deleted run) stops the tracker: said once, and None without a call from then on."""
        if self.stopped:
            return None
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- a refusal or an outage becomes a warning; anything else raises
            kind = refusal(exc)
            if kind is not None:
                self.stop.stop(kind, what, exc)
                return None
            if not isinstance(exc, TrackingError):
                raise
            warn(f"{what} failed ({exc}); {safe}")
            return None
        return ok if out is None and ok is not None else out

    # runs -------------------------------------------------------------------------------------------------
    def open_sweep_run(self, spec: Any, spec_path: str | None, sweep_id: str, storage_path: str, *,
                       wait_s: float, poll_s: float) -> str:
        """The sweep's parent run, waiting out an outage of up to `wait_s` seconds at the start: nothing has
        trained yet, so when the wait runs out the error says so and that the same command can run again."""
        start = time.monotonic()
        while True:
            try:
                return runs.find_or_create_sweep_run(spec, spec_path, self.uri, sweep_id, storage_path=storage_path)
            except TrackingError as exc:  # an outage; a refusal (401/403) raises at once: waiting does not change it
                waited = time.monotonic() - start
                if waited + poll_s > wait_s:
                    raise TrackingError(f"{exc} Waited {waited:.0f} s at the sweep's start (ISOSWEEP_TRACKING_START_WAIT_S="
                                        f"{wait_s:.0f}); nothing was trained: run the same command again once the server is up") from exc
                say(f"waiting for MLflow at {scrub_text(self.uri)} ({waited:.0f} of {wait_s:.0f} s): the sweep starts when it answers")
                time.sleep(poll_s)

    def open_trial_run(self, experiment: str, parent_run_id: str, trial_id: str, params: Mapping[str, Any] | None = None) -> str:
        return runs.open_trial_run(self.uri, experiment, parent_run_id, trial_id, params)

    def find_trial_run(self, experiment: str, parent_run_id: str, trial_id: str) -> Any | None:
        return runs.find_trial_run(self.uri, experiment, parent_run_id, trial_id)

    def end_run(self, run_id: str, status: str = "FINISHED", *, quiet: bool = False) -> None:
        """FINISHED, FAILED or KILLED; quiet=True (inside an `except`) warns instead of raising. Nothing once stopped."""
        if self.stopped:
            return
        runs.end_run(self.uri, run_id, status, quiet=quiet)

    # artifacts and metrics ---------------------------------------------------------------------------------
    def log_trial_result(self, run_id: str, checkpoint_dir: str | os.PathLike, **kwargs: Any) -> None:
        artifacts.log_trial_result(self.uri, run_id, checkpoint_dir, **kwargs)

    def log_final_metrics(self, run_id: str, values: dict[str, float], tags: dict[str, str] | None = None) -> None:
        artifacts.log_final_metrics(self.uri, run_id, values, tags)

    def log_tags(self, what: str, run_id: str, values: Mapping[str, Any]) -> None:
        """Tags on a run (scrubbed and clipped to MLflow's limits)."""
        self.call(what, client(self.uri).log_batch, run_id, tags=tags_of(values))

    def log_sweep_summary(self, parent_run_id: str, **kwargs: Any) -> None:
        artifacts.log_sweep_summary(self.uri, parent_run_id, **kwargs)

    # registry -----------------------------------------------------------------------------------------------
    def register_sweep_models(self, registry_name: str, champion: Any, pareto: Iterable[Any] = (),
                              rows: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> dict[str, str]:
        return registry.register_sweep_models(self.uri, registry_name, champion, pareto, rows, **kwargs)

    def current_champion(self, registry_name: str) -> str | None:
        return registry.current_champion(self.uri, registry_name)

    # sync ---------------------------------------------------------------------------------------------------
    def sync_sweep_dir(self, spec: Any, spec_path: str | None, sweep_dir: str | os.PathLike | Path,
                       storage_path: str | None = None, remote: str | None = None) -> list[tuple[str, str, list[str]]]:
        return sync.sync_sweep_dir(spec, spec_path, self.uri, sweep_dir, storage_path, remote)
