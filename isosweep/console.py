"""isosweep's one output channel: every line the package writes goes through these functions.

- `say`: progress, `[isosweep] ...` on stdout, flushed at once (Ray forwards its workers' stdout to the driver);
- `warn`: something went wrong that the run survives, `[isosweep] warning: ...`, in the same stream as the
  progress so the two keep their order;
- `result`: what a command answers (tables, YAML, URIs, next steps) on stdout, unprefixed, so it can be piped;
- `result_json`: a command's answer as one JSON document on stdout (`--json`), for scripts;
- `note`: about the command itself (why it stopped, what it checked), on stderr, so stdout stays its answer.
Progress bars are `core.progress.progress_bar`'s (the DDIM loops of the lowest layer draw them too).
Libraries' own logging (Ray, MLflow) is left to them; isosweep's modules do not log.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def say(message: str) -> None:
    print(f"[isosweep] {message}", flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}")


def result(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def result_json(value: Any) -> None:
    """`value` as one JSON document on stdout; NaN and infinities become null (strict JSON parsers refuse them)."""
    print(json.dumps(_finite(value), indent=1, default=str), flush=True)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def note(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)
