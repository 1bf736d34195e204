"""`isosweep run`, `resume`, `results` and `status`: a sweep started, continued, and read back."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from isosweep import storage as st
from isosweep.commands.validate import preflight
from isosweep.console import note, result, result_json, say
from isosweep.constants import EXIT_COMPLETED, EXIT_ERROR, EXIT_NO_CHAMPION
from isosweep.evaluation.features.common import unpublished_note
from isosweep.redact import REDACTED, scrub_text, scrub_tree
from isosweep.results.layout import STATE_FILE, find_sweeps, is_done, is_sweep, read_state, resolve_storage
from isosweep.results.lease import refuse_if_held
from isosweep.results.progress import trial_progress
from isosweep.results.readback import read_sweep
from isosweep.results.rows import SweepOutcome
from isosweep.results.seal import refuse_unsealed
from isosweep.results.states import COMPLETED, FAILED, INTERRUPTED
from isosweep.results.summary import RESULTS_CSV, driver_of, public
from isosweep.results.tables import backbones_of, change_plain, plain_table, table_rows
from isosweep.spec import SpecError, SweepSpec, apply_overrides, load_spec, spec_from_dict
from isosweep.spec.changes import spec_for_resume

# The driver (torch, MLflow, the feature networks) and the registry are imported by the verbs that use them:
# `isosweep results` and `status` read storage only and start in seconds.


def run_command(args: argparse.Namespace) -> int:
    """`isosweep run SPEC`: exit 0 with a champion, 1 without one."""
    spec = load_spec(args.spec, args.overrides)
    # before Ray starts: a missing base model or an unreadable image is found once here, not in every trial
    found = preflight(spec, args.spec, tracking_uri=args.tracking_uri, deep=True, storage=args.storage)
    say(f"base model: {scrub_text(found.base_model)}")
    if found.scan is not None:
        say(found.scan.summary())
    from isosweep.sweep.driver import run_sweep  # torch, MLflow, the feature networks: after every check above

    outcome = run_sweep(spec, args.spec, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
                        report_dir=args.report_dir, shared_fs=args.shared_fs)
    print_summary(spec, outcome)
    return exit_code(outcome)


def resume_command(args: argparse.Namespace) -> int:
    """`isosweep resume TARGET`: continue an unfinished sweep with the spec it ran with (saved in its storage).

    TARGET is the sweep's folder or URI, a spec file (its newest unfinished sweep under --storage or the
    spec's storage), or a spec name or sweep id with --storage. --set and a spec file may change only
    fields that do not change results, and only with --allow-changes (`spec.changes`).
    """
    sweep, given = _sweep_to_resume(args)
    state = read_state(sweep)
    if is_done(sweep):
        raise SpecError(f"{scrub_text(sweep)}: the sweep finished already; fix: `isosweep results {scrub_text(sweep)}`, "
                        "or start a new sweep with `isosweep run`")
    refuse_if_held(sweep)  # another driver is running it: refused in seconds, nothing written
    if not args.trust_storage:
        refuse_unsealed(sweep)  # before Tune unpickles the sweep's state (results.seal)
    spec = spec_for_resume(state["spec"], given, allow_changes=args.allow_changes, source=args.target)
    say(f"resuming {state['sweep_id']} from {scrub_text(sweep)} with the spec it ran with")
    spec_path = state.get("spec_path") if state.get("spec_path") and Path(state["spec_path"]).is_file() else None
    from isosweep.sweep.driver import run_sweep  # after every check above: a refusal comes in seconds

    outcome = run_sweep(spec, spec_path, address=args.address, tracking_uri=args.tracking_uri,
                        report_dir=args.report_dir, resume_sweep=sweep, shared_fs=args.shared_fs)
    print_summary(spec, outcome)
    return exit_code(outcome)


def results_command(args: argparse.Namespace) -> int:
    """`isosweep results TARGET` (and `status`): the table, the front and the champion, read from storage.

    TARGET: the sweep's folder or URI, a spec file (its newest sweep), or a spec name or sweep id with --storage.
    """
    sweep = _find_sweep(args.target, args.storage, args.overrides, unfinished=False)
    spec, outcome = read_sweep(sweep)
    recorded = read_state(sweep).get("status")
    if is_done(sweep):
        how = "finished"
    elif recorded in (INTERRUPTED, FAILED):
        how = f"{recorded.lower()}: `isosweep resume {shlex.quote(scrub_text(sweep))}` continues it"
    else:  # RUNNING, or a driver killed before it could record anything else
        how = "running or interrupted"
    csv_uri = st.join(sweep, RESULTS_CSV)
    csv_written = st.exists(csv_uri)
    now = time.time()
    running = {r["trial_id"]: trial_progress(sweep, r["trial_id"], now) for r in outcome.rows if r["status"] == "RUNNING"}
    if getattr(args, "json", False):
        result_json({"sweep_id": outcome.sweep_id, "uri": scrub_text(sweep), "state": recorded, "finished": is_done(sweep),
                     "results_csv": scrub_text(csv_uri) if csv_written else None, "rows": scrub_tree(table_rows(outcome.rows)),
                     "front": [r["trial_id"] for r in outcome.front], "backbones": backbones_of(outcome.rows),
                     "champion": {"trial_id": outcome.champion.row["trial_id"], "reason": outcome.champion.reason}
                     if outcome.champion else None, "driver": public(driver_of(sweep)),
                     "progress": {tid: None if p is None else {"step": p.step, "max_steps": p.max_steps, "checkpoint_at": p.saved_at,
                                                              "eta_s": p.eta_s} for tid, p in running.items()}})
        return EXIT_COMPLETED
    result(f"sweep {outcome.sweep_id} ({how})")
    result(f"storage: {scrub_text(sweep)}")
    result(f"results.csv: {scrub_text(csv_uri)}" if csv_written else
           "results.csv: not written yet (the sweep writes it into its folder when it ends or is stopped)")
    result(plain_table(outcome.rows))
    for tid, progress in running.items():
        result(f"running {tid}: " + (progress.line(now) if progress else "no checkpoint yet"))
    _print_backbones(outcome)
    result("\nPareto front: " + ", ".join(r["trial_id"] for r in outcome.front))
    if outcome.champion:
        result(f"champion: {outcome.champion.row['trial_id']}: {outcome.champion.reason}")
    _print_changes(spec, outcome)
    return EXIT_COMPLETED


def promote_command(args: argparse.Namespace) -> int:
    """`isosweep promote TARGET --trial ID`: move @champion to a trial chosen by hand.

    For a sweep whose automatic promotion was refused (interrupted, failed, or a failed baseline) or a
    champion a person prefers. The trial must have finished and been evaluated; the message says which
    version the alias leaves.
    """
    from isosweep.tracking.artifacts import CheckpointArtifactError
    from isosweep.tracking.tracker import Tracker

    sweep = _find_sweep(args.target, args.storage, args.overrides, unfinished=False)
    spec, outcome = read_sweep(sweep)
    row = next((r for r in outcome.rows if r["trial_id"] == args.trial), None)
    if row is None:
        raise SpecError(f"{args.target}: no trial {args.trial!r} in sweep {outcome.sweep_id}; its trials: "
                        + ", ".join(r["trial_id"] for r in outcome.rows))
    tracking_uri = args.tracking_uri or outcome.tracking_uri
    if not tracking_uri or REDACTED in tracking_uri:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not tracking_uri:
            raise SpecError(f"{args.target}: the sweep's tracking URI carried credentials, which are never stored "
                            f"(saved as {outcome.tracking_uri}); fix: pass --tracking-uri URI or set MLFLOW_TRACKING_URI")
    tracker = Tracker(tracking_uri)
    if row["status"] == "DONE" and not row.get("mlflow_run_id") and outcome.parent_run_id:  # recorded later by sync
        run = tracker.find_trial_run(spec.experiment_name, outcome.parent_run_id, args.trial)
        row["mlflow_run_id"] = run.info.run_id if run is not None else ""
    if row["status"] != "DONE" or not row.get("mlflow_run_id"):
        raise SpecError(f"{args.target}: trial {args.trial} is {row['status']} and "
                        f"{'has' if row.get('mlflow_run_id') else 'has no'} MLflow run (it must have finished, been evaluated "
                        "and recorded); fix: resume the sweep, or `isosweep sync` it, or pick a finished trial")
    before = tracker.current_champion(spec.registry_name)
    try:
        versions = tracker.register_sweep_models(spec.registry_name, row, [], outcome.rows, sweep=scrub_text(args.target),
                                                 extra_tags={"promoted_by": "isosweep promote"})
    except CheckpointArtifactError as exc:  # a cut-off upload: refused, the alias stays where it was
        note(f"error: {exc.line(scrub_text(args.target))}" + (f"; @champion stays at version {before}" if before else ""))
        return EXIT_ERROR
    version = versions.get(row["mlflow_run_id"])
    was = f" (was version {before})" if before else ""
    result(f"models:/{spec.registry_name}@champion -> version {version}, trial {args.trial} of {outcome.sweep_id}{was}")
    return EXIT_COMPLETED


def print_summary(spec: SweepSpec, outcome: SweepOutcome) -> None:
    """The end of a run: the table and where everything is."""
    result()
    result(plain_table(outcome.rows))
    _print_backbones(outcome)
    if outcome.champion:
        c = outcome.champion.row
        result(f"\nchampion: trial {c['trial_id']} (lambda_iso={c['lambda_iso']:.3g}, p={c['p']:g}, G={c['iso_metric']}): {outcome.champion.reason}")
    else:
        result("\nno champion: no trial finished with finite objectives and a finite baseline to compare with")
    _print_changes(spec, outcome)
    state = outcome.state
    where = scrub_text(outcome.sweep_uri or str(outcome.sweep_dir))
    if state is not None:
        result(f"\nsweep state:  {state.describe()}")
        if state.state != COMPLETED:
            result(f"resume with:  isosweep resume {shlex.quote(where)}")
    if outcome.promotion and spec.tracking.register_champion:
        result(f"registry:     promoted nothing: {outcome.promotion}")
    result(f"\nsweep:        {where}")
    if outcome.report_dir:
        result(f"report:       {outcome.report_dir / 'report.md'}")
    elif outcome.sweep_uri:
        result(f"report:       {scrub_text(st.join(outcome.sweep_uri, 'report', 'report.md'))}")
    result(f"status:       isosweep status {shlex.quote(scrub_text(outcome.sweep_uri or str(outcome.sweep_dir)))}")
    if outcome.tracking_uri:
        if outcome.tracking_uri.startswith("sqlite:"):
            result(f"MLflow UI:    mlflow ui --backend-store-uri {outcome.tracking_uri}")
        else:
            result(f"MLflow UI:    {scrub_text(outcome.tracking_uri)}")
    if outcome.champion and outcome.registered and not outcome.promotion:
        uri = f"models:/{spec.registry_name}@champion"
        env = f"MLFLOW_TRACKING_URI={scrub_text(outcome.tracking_uri)} " if outcome.tracking_uri else ""
        result("\nuse the champion:")
        result(f"  {env}isosweep pull {uri} --out champion")
        result("  isosweep sample champion --n 16 --steps 50 --out grid.png")
        result("  isosweep interpolate champion --seeds 1 2 --frames 9 --mode slerp --out strip.png")


def exit_code(outcome: SweepOutcome) -> int:
    """0 completed with a champion (promoted where the spec registers one), 5 completed without one,
    3 some trials errored, 130 interrupted (results.states; README "Exit codes")."""
    if outcome.state is not None and outcome.state.state != COMPLETED:
        return outcome.state.exit_code
    return EXIT_COMPLETED if outcome.champion and not outcome.promotion else EXIT_NO_CHAMPION


def _print_backbones(outcome: SweepOutcome) -> None:
    bb = backbones_of(outcome.rows)
    if bb:
        result("backbones: " + ", ".join(f"{k}={v}" for k, v in sorted(bb.items())))
    note = unpublished_note(bb)
    if note:
        result(f"WARNING: {note}")


def _print_changes(spec: SweepSpec, outcome: SweepOutcome) -> None:
    """What the loss changed against the baseline, with intervals: shown even when the baseline stays champion."""
    changes = change_plain(outcome.rows, spec.evaluation.bootstrap.level)
    if changes:
        result("\n" + changes)


def _sweep_to_resume(args: argparse.Namespace) -> tuple[str, SweepSpec | None]:
    """(sweep URI, the spec given to compare with the saved one, or None to use the saved one as is)."""
    target = args.target
    if _is_spec_file(target):
        spec = load_spec(target, args.overrides)
        return _find_sweep(target, args.storage, args.overrides, unfinished=True, spec=spec), spec
    sweep = _find_sweep(target, args.storage, args.overrides, unfinished=True)
    if not args.overrides:
        return sweep, None
    saved = read_state(sweep)["spec"]
    return sweep, spec_from_dict(apply_overrides(dict(saved), args.overrides), source="--set", check_paths=False)


def _is_spec_file(target: str) -> bool:
    return not st.is_remote(target) and Path(target).is_file() and target.endswith((".yaml", ".yml", ".json"))


def _find_sweep(target: str, storage: str | None, overrides: list[str], *, unfinished: bool, spec: SweepSpec | None = None) -> str:
    """The sweep a command names: a sweep folder/URI itself, else the newest (unfinished) sweep of a spec
    file's name under --storage or its storage, else the sweep id or spec name under --storage."""
    if not _is_spec_file(target) and is_sweep(target):
        return st.normalize(target)
    if _is_spec_file(target):
        spec = spec or load_spec(target, overrides, check_paths=False)
        root, name = resolve_storage(spec, storage), spec.name
    elif storage:
        root, name = st.normalize(storage), target
        exact = st.join(root, target)
        if is_sweep(exact):
            return exact
    else:
        raise SpecError(f"{target}: not a sweep folder or URI (no {STATE_FILE} there) and not a spec file; fix: pass the "
                        "sweep's URI (e.g. s3://BUCKET/PREFIX/NAME-YYYYmmdd-HHMMSS?endpoint_override=...), a spec file, "
                        "or a name with --storage URI")
    found = [s for s in find_sweeps(root, name) if not (unfinished and is_done(s))]
    if not found:
        what = "unfinished sweep" if unfinished else "sweep"
        raise SpecError(f"{target}: no {what} named '{name}-*' under {scrub_text(root)}; fix: pass the --storage the "
                        "sweep ran with (see its storage.path), or start one with `isosweep run`")
    return found[0]
