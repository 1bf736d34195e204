"""`isosweep` command line: argument parsing and dispatch only; each verb group lives in `commands/`.

Importing a command module imports what it runs (Ray for the sweep verbs, MLflow for the model
verbs), so `isosweep --help` and `isosweep validate` still start in a second or two: the commands are
imported when dispatched, not here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping

from isosweep import __version__
from isosweep.console import note
from isosweep.constants import (EXIT_COMPLETED, EXIT_ERROR, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_CHAMPION,
                                EXIT_NOT_RUNNING, EXIT_SPEC_ERROR, EXIT_SWEEP_BUSY, EXIT_TERMINATED, OVERRIDES_ENV, STORAGE_ENV,
                                TRACKING_URI_ENV)
from isosweep.spec import SpecError


MODEL_HELP = "a diffusers folder, a hub id (org/name; the local Hugging Face cache when offline), builtin:shapes, or an MLflow model URI (models:/NAME@alias, runs:/ID/model)"


SET_HELP = "override a field of the spec (repeatable), e.g. --set search.num_trials=2"
TRACKING_HELP = "MLflow tracking URI (default: ISOSWEEP_TRACKING_URI, the spec's tracking.uri, MLFLOW_TRACKING_URI, <storage>/mlflow.db)"
STORAGE_HELP = "where the sweeps live, local or s3:// (default: ISOSWEEP_STORAGE, then the spec's storage.path)"
SHARED_FS_HELP = "the storage is a file system every node mounts at the same path (skips the multi-node storage check)"


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default where it has a meaningful one and the text does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        meaningful = not (default is None or default is False or default is argparse.SUPPRESS or default == [])
        if action.option_strings and meaningful and "default" not in text and not action.required:
            text += " (default: %(default)s)"
        return text


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML sweep spec, e.g. search_spaces/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)


EPILOG = (f"exit codes: {EXIT_COMPLETED} done, {EXIT_ERROR} error (one line; -v prints the traceback), {EXIT_SPEC_ERROR} bad "
          f"spec or arguments, {EXIT_FAILED} some trials failed, {EXIT_SWEEP_BUSY} sweep busy, {EXIT_NO_CHAMPION} sweep "
          f"completed without a champion, {EXIT_NOT_RUNNING} nothing to stop, {EXIT_INTERRUPTED} Ctrl-C, {EXIT_TERMINATED} SIGTERM; the table is the README's "
          f"\"Exit codes\" section")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the answer as one JSON document on stdout (keys: docs/cli.md); notes stay on stderr")


def _image_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options `invert` and `edit` share: where they write, how they run, and the spec that names the distance."""
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--batch-size", type=int, default=16, help="images per UNet call (lower it when memory runs out)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--spec", default="search_spaces/demo.yaml",
                   help="spec whose evaluation section names the perceptual distance (PPL's) and the bootstrap")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isosweep", description="Ray sweeps for Isometric Diffusion fine-tuning",
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"isosweep {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on an unexpected error, print the full traceback (credentials scrubbed), not one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a spec file and print the resolved config")
    _add_spec(p)
    p.add_argument("--no-path-checks", action="store_true",
                   help="skip checks of local paths (dataset, base model): for specs whose data lives on the cluster")
    p.add_argument("--deep", action="store_true",
                   help="also decode every image of an image_folder dataset once and name the unreadable ones (cached)")
    p.add_argument("--tracking-uri", default=None,
                   help="where an MLflow base model (models:/...) is looked up (default: ISOSWEEP_TRACKING_URI, spec, MLFLOW_TRACKING_URI)")
    _add_json(p)

    p = sub.add_parser("run", help="run a sweep (embedded local Ray unless --address)")
    _add_spec(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address: auto, ray://HOST:10001, HOST:6379 (default: RAY_ADDRESS; unset or local: embedded Ray)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--storage", default=None,
                   help="where the sweep lives: a directory, or s3://bucket/prefix[?endpoint_override=HOST:PORT&scheme=http] "
                   "(default: ISOSWEEP_STORAGE, then the spec's storage.path)")
    p.add_argument("--report-dir", default=None,
                   help="also copy the report's files here (the report always goes to <storage>/<sweep>/report; only its own "
                   "files are published, never the rest of this folder)")
    p.add_argument("--shared-fs", action="store_true",
                   help="with --address on a multi-node cluster: every node mounts the local storage path and SQLite file")

    target_help = ("the sweep's folder or URI (e.g. s3://BUCKET/PREFIX/NAME-YYYYmmdd-HHMMSS?endpoint_override=HOST:PORT), "
                   "a spec file (its newest sweep), or a spec name or sweep id with --storage")
    p = sub.add_parser("resume", help="continue an unfinished sweep from its storage, with the spec it ran with")
    p.add_argument("target", help=target_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change a field that does not change results (needs --allow-changes)")
    p.add_argument("--storage", default=None, help="the storage the sweep ran with (for a spec file or name)")
    p.add_argument("--allow-changes", action="store_true",
                   help="allow changes to fields that do not change results (concurrency, tracking, caches, dataset.path)")
    p.add_argument("--address", default=None, help="as for run (default: RAY_ADDRESS)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--report-dir", default=None, help="as for run")
    p.add_argument("--shared-fs", action="store_true", help=SHARED_FS_HELP)
    p.add_argument("--trust-storage", action="store_true",
                   help="restore Tune's state even without a valid seal (it is unpickled: only when you trust whoever can "
                        "write the storage)")

    for verb, text in (("results", "print the results table and Pareto front of a sweep, from its storage"),
                       ("status", "the same table for a running sweep, from any machine")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("target", help=target_help)
        p.add_argument("--storage", default=None, help="where to look for a spec file's or a name's sweeps")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
        _add_json(p)

    p = sub.add_parser("list", help="the sweeps under a storage, newest first: id, state, trials done/planned, champion, started")
    p.add_argument("--storage", default=None,
                   help="a folder or s3://bucket/prefix[?endpoint_override=HOST:PORT&scheme=http] (default: ISOSWEEP_STORAGE)")
    _add_json(p)

    p = sub.add_parser("stop", help="stop a running sweep gracefully (as Ctrl-C: INTERRUPTED, resumable)",
                       description="Send SIGTERM to the sweep's driver, found by its lease, when it runs on this machine; "
                                   "for a driver on another host, say which command stops it there.")
    p.add_argument("target", help=target_help)
    p.add_argument("--storage", default=None, help="where to look for a spec file's or a name's sweeps")
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the driver to end after the signal (0: do not wait); exit 1 if it has not")

    p = sub.add_parser("promote", help="move the registry's @champion alias to a finished trial chosen by hand")
    p.add_argument("target", help=target_help)
    p.add_argument("--trial", required=True, help="the trial id (as `isosweep results` lists it)")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)

    p = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a Ray job",
                       description="Submit a sweep as a Ray job. --set values and --env values travel in the job's "
                                   "environment, never in its entrypoint; only their names are printed.")
    _add_spec(p)
    p.add_argument("--address", default=None,
                   help="dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
    p.add_argument("--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN or `ray get-auth-token`)")
    p.add_argument("--env", dest="env_items", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable for the job (repeatable); KEY alone passes this shell's value")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="YAML or JSON runtime_env merged into the job's (env_vars, pip...; --env wins); "
                        "working_dir and py_modules are isosweep's and refused")
    p.add_argument("--resume", action="store_true",
                   help="the job resumes the newest unfinished sweep of the spec instead of starting one")
    p.add_argument("--trust-storage", action="store_true",
                   help="with --resume: the job restores Tune's state without a valid seal (pass the sweep's key with "
                        "--env ISOSWEEP_STATE_KEY instead where you can)")
    p.add_argument("--shared-fs", action="store_true",
                   help="every node mounts the same file system: allow absolute local storage paths and SQLite/file tracking URIs")
    p.add_argument("--no-wait", action="store_true", help="return after submission instead of following the logs")
    p.add_argument("--json", action="store_true",
                   help="with --no-wait: print the job id, dashboard and commands as one JSON document on stdout (docs/cli.md)")

    p = sub.add_parser("train", help="run one trial (no Tune) with the spec's fixed train values")
    _add_spec(p)
    p.add_argument("--address", default=None, help="as for run (default: RAY_ADDRESS)")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--resume-from", default=None, help="checkpoint directory to continue from")

    p = sub.add_parser("pretrain", help="train (or reuse) the built-in shapes base model")
    p.add_argument("spec", nargs="?", default=None, help="spec whose base_model/dataset to use (default: demo settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--out", default=None, help="also write a sample grid PNG here")

    p = sub.add_parser("eval", help="evaluate a model directory or MLflow model URI (Table-1 row)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--spec", default="search_spaces/demo.yaml", help="spec whose evaluation section to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    p.add_argument("--metrics", nargs="+", default=None, help="subset of fid ppl mrtl mcn vor ls")

    p = sub.add_parser("pull", help="download a registered model and check it loads")
    p.add_argument("model_uri", help="e.g. models:/isodiff-demo@champion")
    p.add_argument("--out", required=True, help="a new or empty folder for the model")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    p = sub.add_parser("sample", help="sample a grid of images from a model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--n", type=int, default=16, help="how many images")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--out", default="grid.png", help="the PNG to write")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    p = sub.add_parser("interpolate", help="interpolate between two seeds' latents and plot frame distances")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2], help="the two seeds whose initial noise the path joins")
    p.add_argument("--frames", type=int, default=9, help="images along the path, both ends included")
    p.add_argument("--mode", choices=["slerp", "lerp"], default="slerp", help="spherical or linear interpolation of the noise")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--out", default="strip.png", help="the PNG to write; the distance plot and JSON go beside it")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)

    p = sub.add_parser("invert", help="DDIM-invert images to their x_T and measure how well they come back",
                       description="Map each image back to the x_T from which DDIM draws it again (the DDIM ODE run forward "
                                   "in time), redraw it from there, and write x_T.npy, the reconstructions and inversion.json.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("images", nargs="*", help="PNG/JPEG files or folders of them (one image at least)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps, the same for the inversion and the redraw")
    p.add_argument("--refine", type=int, default=0,
                   help="fixed-point iterations per inversion step (0: plain DDIM inversion; each costs one more UNet call)")
    _image_model_arguments(p)

    p = sub.add_parser("edit", help="edit images along Local Basis directions and measure how linear the edits are",
                       description="Find the top directions of the encoder's Jacobian at DDIM step t (the Local Basis), "
                                   "draw x_t + gamma v for each direction and gamma, and write one grid per sample "
                                   "(rows: directions, columns: gammas), the directions (basis_*.npy) and edit.json.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--seed", type=int, nargs="+", default=None,
                   help="samples to edit, each the image `isosweep sample --n 1 --seed S` draws (default: 0); "
                        "two or more also measure how far their directions agree")
    p.add_argument("--image", nargs="+", default=None, help="edit these PNG/JPEG files (or folders) instead, DDIM-inverted first")
    p.add_argument("--t", type=int, required=True,
                   help="timestep of the edit, 0..999 (the DDIM step at or below it); high t: coarse, global edits")
    p.add_argument("--gamma", required=True,
                   help="step sizes along each unit direction: G for -G..G, or LO..HI (write --gamma=-20..60)")
    p.add_argument("--columns", type=int, default=7, help="gammas per row, evenly spaced over the range")
    p.add_argument("--directions", type=int, nargs="+", default=[0, 1, 2],
                   help="Local Basis indices, one grid row each (0: the largest singular value)")
    p.add_argument("--combine", type=int, nargs="+", default=None,
                   help="one more row along the normalised sum of these directions, e.g. --combine 0 1")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (and inversion steps for --image)")
    p.add_argument("--iterations", type=int, default=8,
                   help="subspace-iteration rounds for the directions; edit.json's residuals say whether it was enough")
    p.add_argument("--vectors-per-pass", type=int, default=None,
                   help="copies of x_t through the encoder at once while finding the directions (default: all, "
                        "k + 4); lower it when memory runs out (docs/editing.md has the memory per vector)")
    _image_model_arguments(p)

    p = sub.add_parser("sync", help="upload to MLflow what a sweep's storage holds but the tracking server lacks")
    p.add_argument("target", help=target_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    for p in sub.choices.values():  # -v after the verb too; SUPPRESS keeps a -v given before the verb
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as `isosweep -v`")
        p.formatter_class = _HelpFormatter
    return parser


# cheap checks of arguments, made before a command imports torch or MLflow: verb -> ((option, least value), ...)
AT_LEAST = {"sample": (("n", 1), ("steps", 1)), "interpolate": (("frames", 2), ("steps", 1)),
            "edit": (("steps", 1), ("columns", 2), ("iterations", 1), ("batch_size", 1), ("t", 0), ("vectors_per_pass", 1)),
            "stop": (("wait", 0),)}
NEW_FOLDER = {"pull": "out", "invert": "out", "edit": "out"}  # verb -> option naming a folder that must be new or empty
MODEL_VERBS = ("eval", "sample", "interpolate", "invert", "edit")  # verbs whose MODEL is a folder, hub id or MLflow URI


def env_defaults(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """ISOSWEEP_STORAGE and ISOSWEEP_TRACKING_URI as the values of --storage and --tracking-uri where the verb takes
    them and the command line left them out: the flag, then the variable, then the spec (an empty variable is unset)."""
    environ = os.environ if environ is None else environ
    for attr, var in (("storage", STORAGE_ENV), ("tracking_uri", TRACKING_URI_ENV)):
        if hasattr(args, attr) and getattr(args, attr) is None and environ.get(var):
            setattr(args, attr, environ[var])


RAY_ADDRESS_VERBS = ("run", "resume", "train")  # the verbs that join a cluster as its driver (submit reads it itself)


def ray_address_default(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """RAY_ADDRESS as --address of run, resume and train when the command line gave none, as `ray.init` reads it: `local`
    (or empty) starts the embedded Ray, anything else (`auto`, HOST:6379, ray://HOST:10001) joins that cluster with the
    checks --address gets. A dashboard URL (http://HEAD:8265, what `ray job submit` takes) cannot be joined: a SpecError."""
    environ = os.environ if environ is None else environ
    value = (environ.get("RAY_ADDRESS") or "").strip()
    if args.command not in RAY_ADDRESS_VERBS or args.address is not None or value in ("", "local"):
        return
    if value.startswith(("http://", "https://")):
        from isosweep.redact import scrub_text  # stdlib only

        raise SpecError(f"RAY_ADDRESS={scrub_text(value)} is a dashboard address, which `isosweep submit` (and `ray job submit`) "
                        f"take; `isosweep {args.command}` joins a cluster by HOST:6379, auto or ray://HOST:10001; fix: "
                        f"`isosweep submit`, pass --address, or unset RAY_ADDRESS (RAY_ADDRESS=local: the embedded Ray)")
    args.address = value


def check_arguments(args: argparse.Namespace) -> None:
    """SpecError (exit 2, one line) for an argument that cannot work, before the command loads anything."""
    for name, least in AT_LEAST.get(args.command, ()):
        value = getattr(args, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise SpecError(f"{flag} must be at least {least} (got {value}); fix: pass {flag} {least} or more")
    name = NEW_FOLDER.get(args.command)
    if name:
        from pathlib import Path

        out = Path(getattr(args, name)).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SpecError(f"--{name} {out} exists and is not an empty folder; fix: choose a new folder")
    if args.command in MODEL_VERBS:
        from isosweep.models.sources import unusable_source  # no torch

        problem = unusable_source(args.model)
        if problem:
            raise SpecError(problem)


def _env_overrides() -> list[str]:
    """The items of OVERRIDES_ENV; [] when it is unset; a SpecError when it is not a JSON list of strings."""
    raw = os.environ.get(OVERRIDES_ENV)
    if raw is None:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise SpecError(f"{OVERRIDES_ENV} must be a JSON list of \"KEY=VALUE\" strings, e.g. '[\"search.num_trials=2\"]'; "
                        f"fix: set it so, or unset it and pass --set KEY=VALUE")
    return items


_terminated = threading.Event()  # a SIGTERM arrived: an interrupted command exits 143, not 130


def _on_sigterm(signum: int, frame) -> None:
    """SIGTERM stops a command as Ctrl-C does: it goes to whatever handles SIGINT now (Ray Tune's graceful stop while
    a sweep's trials run, so the sweep records INTERRUPTED, ends its runs KILLED and stays resumable; a
    KeyboardInterrupt elsewhere). A second SIGTERM then acts as a second Ctrl-C."""
    _terminated.set()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script) or default: stop all the same
        raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _interrupted() -> int:
    return EXIT_TERMINATED if _terminated.is_set() else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _terminated.clear()
    _stop_on_sigterm()
    try:
        if hasattr(args, "overrides"):
            args.overrides = [*(args.overrides or []), *_env_overrides()]
        env_defaults(args)
        ray_address_default(args)
        check_arguments(args)
        code = int(_dispatch(args) or 0)
        return _interrupted() if code == EXIT_INTERRUPTED else code
    except SpecError as exc:  # messages name files and URIs: scrubbed, since a URI may carry a key
        from isosweep.redact import scrub_text  # stdlib only: keeps `isosweep --help` fast

        note(f"error: {scrub_text(str(exc))}")
        return getattr(exc, "exit_code", EXIT_SPEC_ERROR)  # a refusal with its own code (a busy sweep) says so
    except KeyboardInterrupt:
        note("interrupted; `isosweep resume SWEEP_URI` (printed above) continues from the last checkpoints")
        return _interrupted()
    except Exception as exc:  # a cause deep in MLflow/requests may quote a URI with its credentials
        from isosweep.redact import format_exception_scrubbed  # stdlib only

        if args.verbose:
            note(format_exception_scrubbed(exc), end="")
        else:
            note(f"error: {error_line(exc)} (run with -v for the traceback)")
        return EXIT_ERROR


def error_line(exc: BaseException) -> str:
    """`Type: message` of the outermost exception on one line, scrubbed (its causes are in the -v traceback)."""
    from isosweep.redact import scrub_text  # stdlib only

    message = " ".join(str(exc).split())
    return scrub_text(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


# verb -> (module in isosweep.commands, function)
COMMANDS = {
    "validate": ("validate", "validate_command"),
    "run": ("sweep", "run_command"),
    "resume": ("sweep", "resume_command"),
    "results": ("sweep", "results_command"),
    "status": ("sweep", "results_command"),
    "promote": ("sweep", "promote_command"),
    "list": ("listing", "list_command"),
    "stop": ("control", "stop_command"),
    "submit": ("submit", "submit_command"),
    "train": ("train", "train_command"),
    "pretrain": ("models", "pretrain_command"),
    "eval": ("evaluate", "eval_command"),
    "pull": ("models", "pull_command"),
    "sample": ("models", "sample_command"),
    "interpolate": ("models", "interpolate_command"),
    "invert": ("invert", "invert_command"),
    "edit": ("edit", "edit_command"),
    "sync": ("sync", "sync_command"),
}


def _dispatch(args: argparse.Namespace) -> int | None:
    module, function = COMMANDS[args.command]
    # imported on dispatch, not at the top: the sweep verbs import Ray and the model verbs MLflow and
    # torch, which would make `isosweep --help` and `isosweep validate` take several seconds
    return getattr(importlib.import_module(f"isosweep.commands.{module}"), function)(args)


if __name__ == "__main__":
    sys.exit(main())
