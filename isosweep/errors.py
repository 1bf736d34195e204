"""Which errors a retry can fix: deterministic errors fail a trial at once, the others are retried.

An exception class is deterministic when it says so with a class attribute `deterministic = True`
(bad spec, non-finite loss, an image file that cannot be decoded or is missing, unreadable label file,
corrupt or unsafe checkpoint): run again with the same inputs and seed, it fails the same way, so retrying
only burns GPU hours. Everything else (a lost worker or node, a timeout, an I/O error of the storage while a
file is read) is treated as infrastructure and retried under the trial's one failure budget
(`search.max_failures`). A marker attribute rather than a base class, so each
layer keeps its own exception types without importing this module. Python's own errors of a wrong program
(`TypeError`, `NameError`: a call with the wrong arguments, a misspelt name) are deterministic too: the same
code fails the same way on any node.
"""

from __future__ import annotations

from collections.abc import Iterator

PROGRAM_ERRORS = (TypeError, NameError)  # raised by the code itself, not by a node, a network or a store


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions an error wraps: its cause and context, Ray's `cause`, Ray Train's worker failures."""
    for attr in ("__cause__", "__context__", "cause"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException):
            yield inner
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        yield from (e for e in failures.values() if isinstance(e, BaseException))
    yield from (a for a in getattr(exc, "args", ()) if isinstance(a, BaseException))


def deterministic_cause(exc: BaseException | None) -> BaseException | None:
    """The deterministic error inside `exc` (itself, or anything it wraps), or None."""
    seen: set[int] = set()
    todo = [exc] if exc is not None else []
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(type(e), "deterministic", False) or isinstance(e, PROGRAM_ERRORS):
            return e
        todo.extend(_linked(e))
    return None
