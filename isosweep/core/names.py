"""Names of the paper's choices that the spec validates against, kept free of torch so that loading a spec
(and `isosweep --help`) does not import it."""

from __future__ import annotations

ISO_METRICS = ("stereographic", "identity", "ambient")  # the metric G on the noise space (train.iso_metric)
REDUCTIONS = ("local", "global")  # the isometry ratio per worker, or over all-reduced means (train.iso_reduction)
