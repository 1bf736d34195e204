"""isosweep's one output channel: every line the package writes goes through these four functions (and its
progress bars through `progress`).

- `say`: progress, `[isosweep] ...` on stdout, flushed at once (Ray forwards its workers' stdout to the driver);
- `warn`: something went wrong that the run survives, `[isosweep] warning: ...`, in the same stream as the
  progress so the two keep their order;
- `result`: what a command answers (tables, YAML, URIs, next steps) on stdout, unprefixed, so it can be piped;
- `note`: about the command itself (why it stopped, what it checked), on stderr, so stdout stays its answer.
- `progress_bar`: a tqdm bar, quiet off a terminal (one line every ISOSWEEP_PROGRESS_INTERVAL seconds, 30).
Libraries' own logging (Ray, MLflow) is left to them; isosweep's modules do not log.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PROGRESS_INTERVAL_ENV = "ISOSWEEP_PROGRESS_INTERVAL"
PROGRESS_INTERVAL_S = 30.0


def say(message: str) -> None:
    print(f"[isosweep] {message}", flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}")


def result(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def note(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def progress_interval() -> float:
    """Seconds between two redraws of a bar off a terminal: ISOSWEEP_PROGRESS_INTERVAL, else 30."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else PROGRESS_INTERVAL_S
    except ValueError:
        raise ValueError(f"{PROGRESS_INTERVAL_ENV}={raw!r} is not a number of seconds") from None


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar (tqdm's arguments, `file` stderr by default). On a terminal it redraws as tqdm does; written to
    anything else (a file, CI, a Ray job's log) it redraws at most every `progress_interval()` seconds, in ASCII:
    each redraw there is another carriage-return update kept in the log, many a second otherwise."""
    from tqdm.auto import tqdm  # here, not at import: the CLI starts without it

    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    widget = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's bar in a notebook: not a log
    if not widget and not (isatty and isatty()):
        kwargs.setdefault("mininterval", progress_interval())
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)
