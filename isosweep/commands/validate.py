"""`isosweep validate SPEC`: check a spec file and print the resolved config."""

from __future__ import annotations

import argparse
import sys

import yaml

from isosweep.config import load_spec


def validate_command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides, check_paths=not args.no_path_checks)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    print(f"ok: {args.spec} is a valid sweep spec", file=sys.stderr)
    return 0
