"""`isosweep` command line: argument parsing and dispatch only; each verb group lives in `commands/`.

Importing a command module imports what it runs (Ray for the sweep verbs, MLflow for the model
verbs), so `isosweep --help` and `isosweep validate` still start in a second or two: the commands are
imported when dispatched, not here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from isosweep.config import SpecError


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML sweep spec, e.g. search_spaces/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable), e.g. --set search.num_trials=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isosweep", description="Ray sweeps for Isometric Diffusion fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a spec file and print the resolved config")
    _add_spec(p)
    p.add_argument("--no-path-checks", action="store_true",
                   help="skip checks of local paths (dataset, base model): for specs whose data lives on the cluster")

    p = sub.add_parser("run", help="run a sweep (embedded local Ray unless --address)")
    _add_spec(p)
    p.add_argument("--address", default=None, help="Ray cluster address: auto, ray://HOST:10001, HOST:6379")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: spec, MLFLOW_TRACKING_URI, or local sqlite)")
    p.add_argument("--storage", default=None, help="local directory or s3://bucket/prefix for Tune results and checkpoints")
    p.add_argument("--report-dir", default=None, help="where the report folder goes (default: <storage>/<sweep>/report)")

    p = sub.add_parser("resume", help="continue an interrupted sweep from its storage")
    _add_spec(p)
    p.add_argument("--address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--report-dir", default=None)

    p = sub.add_parser("results", help="print the results table and Pareto front of a sweep")
    p.add_argument("sweep", help="spec file, or the sweep's storage directory")
    p.add_argument("--storage", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])

    p = sub.add_parser("status", help="alias of results for a running sweep")
    p.add_argument("sweep")
    p.add_argument("--storage", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])

    p = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a Ray job")
    _add_spec(p)
    p.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN or `ray get-auth-token`)")
    p.add_argument("--no-wait", action="store_true", help="return after submission instead of following the logs")

    p = sub.add_parser("train", help="run one trial (no Tune) with the spec's fixed train values")
    _add_spec(p)
    p.add_argument("--address", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--resume-from", default=None, help="checkpoint directory to continue from")

    p = sub.add_parser("pretrain", help="train (or reuse) the built-in shapes base model")
    p.add_argument("spec", nargs="?", default=None, help="spec whose base_model/dataset to use (default: demo settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--out", default=None, help="also write a sample grid PNG here")

    p = sub.add_parser("eval", help="evaluate a model directory or MLflow model URI (Table-1 row)")
    p.add_argument("model", help="diffusers directory or MLflow model URI")
    p.add_argument("--spec", default="search_spaces/demo.yaml", help="spec whose evaluation section to use")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--metrics", nargs="+", default=None, help="subset of fid ppl mrtl mcn vor ls")

    p = sub.add_parser("pull", help="download a registered model and check it loads")
    p.add_argument("model_uri", help="e.g. models:/isodiff-demo@champion")
    p.add_argument("--out", required=True)
    p.add_argument("--tracking-uri", default=None)

    p = sub.add_parser("sample", help="sample a grid of images from a model")
    p.add_argument("model", help="diffusers directory or MLflow model URI")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--tracking-uri", default=None)

    p = sub.add_parser("interpolate", help="interpolate between two seeds' latents and plot frame distances")
    p.add_argument("model", help="diffusers directory or MLflow model URI")
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--mode", choices=["slerp", "lerp"], default="slerp")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="strip.png")
    p.add_argument("--tracking-uri", default=None)

    p = sub.add_parser("sync", help="upload to MLflow what a sweep's storage holds but the tracking server lacks")
    _add_spec(p)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--storage", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `isosweep resume SPEC` continues from the last checkpoints", file=sys.stderr)
        return 130


# verb -> (module in isosweep.commands, function)
COMMANDS = {
    "validate": ("validate", "validate_command"),
    "run": ("sweep", "run_command"),
    "resume": ("sweep", "resume_command"),
    "results": ("sweep", "results_command"),
    "status": ("sweep", "results_command"),
    "submit": ("submit", "submit_command"),
    "train": ("train", "train_command"),
    "pretrain": ("models", "pretrain_command"),
    "eval": ("evaluate", "eval_command"),
    "pull": ("models", "pull_command"),
    "sample": ("models", "sample_command"),
    "interpolate": ("models", "interpolate_command"),
    "sync": ("sync", "sync_command"),
}


def _dispatch(args: argparse.Namespace) -> int | None:
    module, function = COMMANDS[args.command]
    # imported on dispatch, not at the top: the sweep verbs import Ray and the model verbs MLflow and
    # torch, which would make `isosweep --help` and `isosweep validate` take several seconds
    return getattr(importlib.import_module(f"isosweep.commands.{module}"), function)(args)


if __name__ == "__main__":
    sys.exit(main())
