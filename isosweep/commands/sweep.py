"""`isosweep run`, `resume`, `results` and `status`: a sweep started, continued, and read back."""

from __future__ import annotations

import argparse
from pathlib import Path

from isosweep.config import SpecError, SweepSpec, load_spec
from isosweep.results.layout import DONE_MARKER, STATE_FILE, find_sweeps, resolve_storage
from isosweep.results.rows import SweepOutcome
from isosweep.results.tables import backbones_of, plain_table
from isosweep.sweep.driver import load_outcome, run_sweep


def run_command(args: argparse.Namespace, resume: bool = False) -> int:
    """`isosweep run SPEC` / `isosweep resume SPEC`: exit 0 with a champion, 1 without one."""
    spec = load_spec(args.spec, args.overrides)
    resume_dir = _unfinished_sweep(spec, args) if resume else None
    outcome = run_sweep(spec, args.spec, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
                        report_dir=args.report_dir, resume_dir=resume_dir)
    print_summary(spec, outcome)
    return 0 if outcome.champion else 1


def resume_command(args: argparse.Namespace) -> int:
    """`isosweep resume SPEC`: continue the newest unfinished sweep of the spec's name."""
    return run_command(args, resume=True)


def results_command(args: argparse.Namespace) -> int:
    """`isosweep results SPEC|SWEEP_DIR` (and `status`): the table, the front and the champion, from storage."""
    target = Path(args.sweep)
    if target.is_dir() and (target / STATE_FILE).is_file():
        sweep_dir = target
    else:
        spec = load_spec(args.sweep, args.overrides, check_paths=False)
        found = find_sweeps(resolve_storage(spec, args.storage), spec.name)
        if not found:
            raise SpecError(f"{args.sweep}: no sweep named '{spec.name}-*' found; fix: pass --storage or the sweep folder")
        sweep_dir = found[0]
    spec, outcome = load_outcome(sweep_dir)
    done = (sweep_dir / DONE_MARKER).exists()
    print(f"sweep {outcome.sweep_id} ({'finished' if done else 'running or interrupted'})")
    print(plain_table(outcome.rows))
    print("\nPareto front: " + ", ".join(r["trial_id"] for r in outcome.front))
    if outcome.champion:
        print(f"champion: {outcome.champion.row['trial_id']}: {outcome.champion.reason}")
    return 0


def print_summary(spec: SweepSpec, outcome: SweepOutcome) -> None:
    """The end of a run: the table and where everything is."""
    print()
    print(plain_table(outcome.rows))
    bb = backbones_of(outcome.rows)
    if bb:
        print("backbones: " + ", ".join(f"{k}={v}" for k, v in sorted(bb.items())))
    if outcome.champion:
        c = outcome.champion.row
        print(f"\nchampion: trial {c['trial_id']} (lambda_iso={c['lambda_iso']:.3g}, p={c['p']:g}, G={c['iso_metric']}): {outcome.champion.reason}")
    else:
        print("\nno champion: no trial finished with finite objectives")
    print(f"\nsweep folder: {outcome.sweep_dir}")
    if outcome.report_dir:
        print(f"report:       {outcome.report_dir / 'report.md'}")
    if outcome.tracking_uri:
        if outcome.tracking_uri.startswith("sqlite:"):
            print(f"MLflow UI:    mlflow ui --backend-store-uri {outcome.tracking_uri}")
        else:
            print(f"MLflow UI:    {outcome.tracking_uri}")
    if outcome.champion and outcome.registered:
        uri = f"models:/{spec.registry_name}@champion"
        env = f"MLFLOW_TRACKING_URI={outcome.tracking_uri} " if outcome.tracking_uri else ""
        print("\nuse the champion:")
        print(f"  {env}isosweep pull {uri} --out champion")
        print("  isosweep sample champion --n 16 --steps 50 --out grid.png")
        print("  isosweep interpolate champion --seeds 1 2 --frames 9 --mode slerp --out strip.png")


def _unfinished_sweep(spec: SweepSpec, args: argparse.Namespace) -> Path:
    """The newest sweep of this spec's name under the storage that has no done marker."""
    storage = resolve_storage(spec, args.storage)
    candidates = [p for p in find_sweeps(storage, spec.name) if not (p / DONE_MARKER).exists()]
    if not candidates:
        raise SpecError(
            f"{args.spec}: no unfinished sweep named '{spec.name}-*' under {storage}; "
            "fix: start one with `isosweep run`, or pass the same --storage as the interrupted run"
        )
    return candidates[0]
