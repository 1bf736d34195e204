"""Where one sweep lives and what its state file says: the only writer of `isosweep_sweep.json`, `spec.yaml` and
`sweep_done.json` (their layout: `results.layout`).

No credential is ever stored with a sweep (storage may be a bucket others read): the spec and every URI are scrubbed
before they are written, and a resume takes credentials from its own arguments and environment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from isosweep import storage as st
from isosweep.console import warn
from isosweep.redact import scrub_text, scrub_tree
from isosweep.results.layout import (
    DONE_MARKER,
    SPEC_FILE,
    STATE_FILE,
    lease_uri,
    new_sweep_id,
    read_state,
    resolve_storage,
    sweep_uri,
    train_storage,
)
from isosweep.results.states import RUNNING, SweepState
from isosweep.spec import SpecError, SweepSpec


@dataclass
class SweepPlace:
    """Where one sweep lives: its id, the storage it is under, its folder (the Tune experiment), the Train
    runs, and a local staging folder for the files written here and then uploaded (the sweep folder itself
    for local storage); `state` is its state file's content as this process knows it."""

    sweep_id: str
    storage: str
    sweep_uri: str
    train_storage: str
    staging: Path
    staging_is_temporary: bool
    state: dict
    lease_uri: str = ""  # the driver's lease (results.lease), taken before anything of the sweep is written
    resuming: bool = False

    @classmethod
    def open(cls, spec: SweepSpec, storage: str | None, resume_sweep: str | None) -> SweepPlace:
        """A new sweep's place, or the one of the sweep being resumed (found where its state file is)."""
        if resume_sweep is not None:
            sweep = st.normalize(resume_sweep)
            state = read_state(sweep)
            sweep_id, root = state["sweep_id"], st.parent_of(sweep)
            if sweep_id != st.name_of(sweep):  # a state file copied or planted from another sweep
                raise SpecError(f"{scrub_text(st.join(sweep, STATE_FILE))}: it names sweep {sweep_id!r}, not this folder's "
                                f"{st.name_of(sweep)!r}; fix: resume the sweep's own folder (a sweep cannot be renamed)")
        else:
            state, root = {}, resolve_storage(spec, storage)
            sweep_id = new_sweep_id(spec)
        uri = sweep_uri(root, sweep_id)
        staging, temporary = st.staging_dir(uri, prefix=f"isosweep-{sweep_id}-")
        return cls(sweep_id, root, uri, train_storage(root, sweep_id), staging, temporary, state, lease_uri(root, sweep_id),
                   resuming=resume_sweep is not None)

    def record_start(self, spec: SweepSpec, spec_path: str | None, tracking_uri: str, parent_run_id: str) -> None:
        """The state file and the spec as it ran, in storage before any trial starts (a resume reads both back)."""
        self.state.update({"sweep_id": self.sweep_id, "spec": scrub_tree(spec.to_dict()), "spec_path": spec_path,
                           "storage": scrub_text(self.storage), "experiment_path": scrub_text(self.sweep_uri),
                           "tracking_uri": scrub_text(tracking_uri), "parent_run_id": parent_run_id,
                           "started": self.state.get("started") or time.time(), "status": RUNNING})
        if self.resuming:
            self.state["resumed"] = [*self.state.get("resumed", []), time.time()]
        st.write_json(st.join(self.sweep_uri, STATE_FILE), self.state)
        st.write_bytes(st.join(self.sweep_uri, SPEC_FILE), yaml.safe_dump(scrub_tree(spec.to_dict()), sort_keys=False).encode())

    def record_concurrency(self, trials_at_once: int) -> None:
        """How many trials the sweep's Tune experiment runs at once, fixed when it starts (a resume warns when its
        spec or cluster would now say otherwise)."""
        self.state["trial_concurrency"] = trials_at_once
        st.write_json(st.join(self.sweep_uri, STATE_FILE), self.state)

    def record_state(self, state: SweepState, reason: str = "", tracking_pending: list[str] | None = None) -> None:
        """The sweep's state into its state file in storage (status, what is unfinished, when)."""
        self.state.update({"status": state.state, "unfinished": state.unfinished, "errored": state.errored,
                           "not_started": state.not_started, "status_reason": reason, "status_time": time.time(),
                           "tracking_pending": tracking_pending or []})
        uri = st.join(self.sweep_uri, STATE_FILE)
        try:
            st.write_json(uri, self.state)
        except OSError as exc:  # storage down: say so, but never replace the error being handled
            warn(f"could not record the sweep's state {state.state} in storage: {exc}")

    def record_done(self, champion_trial: str | None) -> None:
        """The done marker of a completed sweep (`isosweep status` and `resume` read it)."""
        uri = st.join(self.sweep_uri, DONE_MARKER)
        st.write_json(uri, {"finished": time.time(), "champion": champion_trial})
