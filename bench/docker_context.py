"""The Docker build context of clusters/Dockerfile: which files `docker build .` sends, with and without .dockerignore.

    python -m bench.docker_context [ROOT]

ROOT defaults to this checkout (another one, e.g. with its .venv, is measured with this checkout's .dockerignore).
Prints the file count and size of the context without .dockerignore (every file
under ROOT, what Docker sends when there is none) and with it. The patterns are applied by docker-py's
`exclude_paths`, the Python client's implementation of the .dockerignore rules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from docker.utils.build import exclude_paths

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "clusters/Dockerfile"


def ignore_patterns(root: Path = ROOT) -> list[str]:
    """The patterns of root/.dockerignore, comments and blank lines left out."""
    lines = (root / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def context_files(root: Path = ROOT, patterns: list[str] | None = None) -> list[str]:
    """Files (relative paths) the build context holds under these patterns (default: root's .dockerignore)."""
    kept = exclude_paths(str(root), ignore_patterns(root) if patterns is None else patterns, dockerfile=DOCKERFILE)
    return sorted(p for p in kept if os.path.isfile(root / p) and not os.path.islink(root / p))


def size_mb(root: Path, files: list[str]) -> float:
    return sum((root / f).stat().st_size for f in files) / 1e6


def main(argv: list[str]) -> None:
    root = Path(argv[0]).resolve() if argv else ROOT
    every = [str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs if not os.path.islink(Path(d, f))]
    kept = context_files(root, ignore_patterns())  # this checkout's .dockerignore, on ROOT's files
    print(f"without .dockerignore: {len(every)} files, {size_mb(root, every):.1f} MB")
    print(f"with .dockerignore:    {len(kept)} files, {size_mb(root, kept):.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
