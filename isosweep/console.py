"""isosweep's one output channel: every line the package writes goes through these four functions.

- `say`: progress, `[isosweep] ...` on stdout, flushed at once (Ray forwards its workers' stdout to the driver);
- `warn`: something went wrong that the run survives, `[isosweep] warning: ...`, in the same stream as the
  progress so the two keep their order;
- `result`: what a command answers (tables, YAML, URIs, next steps) on stdout, unprefixed, so it can be piped;
- `note`: about the command itself (why it stopped, what it checked), on stderr, so stdout stays its answer.
Progress bars are `core.progress.progress_bar`'s (the DDIM loops of the lowest layer draw them too).
Libraries' own logging (Ray, MLflow) is left to them; isosweep's modules do not log.
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(f"[isosweep] {message}", flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}")


def result(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def note(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)
