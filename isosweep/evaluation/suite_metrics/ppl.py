"""PPL in the suite: every rank measures its range of slerp pairs (or, with ppl.stop_width, rounds of pairs until the
interval is tight); rank 0 summarises them with their bootstrap interval and quantiles."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from isosweep.evaluation.metrics.confidence import ppl_interval_tight, ppl_summary
from isosweep.evaluation.metrics.ppl import ppl_distances, sequential_pairs
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register


@register
class Ppl(Metric):
    names = ("ppl",)
    needs = ("ppl",)

    def share(self, s: Shard, nets) -> np.ndarray:
        """This rank's PPL pairs; with ppl.stop_width, rounds until the interval is tight (rank 0 returns them all)."""
        t0, spec = time.time(), s.eval_spec
        lo, hi = s.range(spec.ppl.num_samples)
        on_batch = s.started("ppl", hi - lo)

        def compute(a: int, b: int) -> np.ndarray:
            samples = s.samples(spec.ppl.num_samples, spec.ppl.ddim_steps, a, b, max(1, spec.batch_size // 2),
                                on_batch if spec.ppl.stop_width is None else None)
            return ppl_distances(samples, nets.distance, eps=spec.ppl.eps, method=spec.ppl.method,
                                 precision=spec.ppl.precision)

        if spec.ppl.stop_width is None:
            out = compute(lo, hi)
        else:
            out = sequential_pairs(compute, s.gather, num_samples=spec.ppl.num_samples, round_pairs=spec.ppl.round_pairs,
                                   rank=s.rank, world_size=s.world_size, enough=lambda d: _tight(d, spec, on_batch, s.world_size))
            out = out if s.rank == 0 else out[:0]  # gathered in rank order: rank 0 holds every pair, in pair order
        on_batch(hi - lo)
        s.timings["ppl"] = time.time() - t0
        return out

    def combine(self, result, shares: list[np.ndarray], s: Shard, nets) -> None:
        result.values["ppl_pairs"] = d = np.concatenate(shares)  # pair order: ranks hold ranges
        result.metrics.update(ppl_summary(d, **s.boot))
        if s.eval_spec.ppl.stop_width is not None:  # sequential: how many pairs it took
            result.metrics["ppl_n"] = float(len(d))

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"ppl": eval_spec.ppl.model_dump()}


def _tight(d: np.ndarray, spec, on_batch: Callable[[int], None], world_size: int) -> bool:
    """Sequential PPL's look after a round (`ppl_interval_tight`), with the progress bar moved on."""
    on_batch(len(d) // world_size)
    return ppl_interval_tight(d, stop_width=spec.ppl.stop_width, level=spec.bootstrap.level, seed=spec.seed)
