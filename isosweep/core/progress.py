"""isosweep's progress bars, in one place: `progress_bar` is tqdm, quiet where it is not drawn on a terminal.

Off a terminal (a file, CI, `nohup`, a Ray job's log) every redraw of a bar is one more carriage-return update kept in
the log, many a second by tqdm's default; there a bar redraws at most every ISOSWEEP_PROGRESS_INTERVAL seconds (30),
in ASCII. On a terminal, or as a notebook's widget, it is tqdm's own bar. Here, in the lowest layer, because the DDIM
loops of `core/` draw bars too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PROGRESS_INTERVAL_ENV = "ISOSWEEP_PROGRESS_INTERVAL"
PROGRESS_INTERVAL_S = 30.0


def progress_interval() -> float:
    """Seconds between two redraws of a bar off a terminal: ISOSWEEP_PROGRESS_INTERVAL, else 30."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else PROGRESS_INTERVAL_S
    except ValueError:
        raise ValueError(f"{PROGRESS_INTERVAL_ENV}={raw!r} is not a number of seconds") from None


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar (tqdm's arguments; `file` is stderr by default): tqdm's own on a terminal, else redrawn at most every
    `progress_interval()` seconds, in ASCII (a caller's own `mininterval` or `ascii` wins)."""
    from tqdm.auto import tqdm  # here, not at import: the CLI starts without it

    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    widget = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's bar in a notebook: not a log
    if not widget and not (isatty and isatty()):
        kwargs.setdefault("mininterval", progress_interval())
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)
