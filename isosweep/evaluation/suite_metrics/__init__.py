"""The metrics of the evaluation suite, one module each, registered on import (`base.register`).

The built-ins are imported first, in the order they run and record their numbers; any further module of this folder
is found and imported after them, so adding a metric is adding its file (docs/metrics.md, "Adding a metric").
"""

import importlib
import pkgutil

from isosweep.evaluation.suite_metrics.base import REGISTRY, Metric, Progress, Shard, register, selected, shard_range

_BUILT_IN = ("fid", "ppl", "mrtl", "jacobian", "ls")


def import_metric_modules() -> None:
    """Import (and so register) every metric module of this folder: the built-ins first, then the others by name."""
    added = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in (*_BUILT_IN, "base"))
    for name in (*_BUILT_IN, *added):
        importlib.import_module(f"{__name__}.{name}")


import_metric_modules()

__all__ = ["REGISTRY", "Metric", "Progress", "Shard", "import_metric_modules", "register", "selected", "shard_range"]
