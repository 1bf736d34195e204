"""The one way isosweep prints a progress line: `[isosweep] ...`, flushed at once (logs of Ray workers too)."""

from __future__ import annotations


def say(message: str) -> None:
    print(f"[isosweep] {message}", flush=True)
