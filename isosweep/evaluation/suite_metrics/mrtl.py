"""mRTL in the suite: every rank runs the DDIM trajectories of its range of slerp pairs; rank 0 gives mRTL, the
RTL(t) curve and the interval over pairs."""

from __future__ import annotations

import time
from typing import Any

import torch

from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.metrics.rtl import pair_mrtl, rtl_per_pair, summarize_rtl
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register


@register
class Mrtl(Metric):
    names = ("mrtl",)

    def share(self, s: Shard, nets) -> torch.Tensor:
        t0, spec = time.time(), s.eval_spec.mrtl
        lo, hi = s.range(spec.num_pairs)
        on_batch = s.started("mrtl", hi - lo)
        samples = s.samples(spec.num_pairs, spec.ddim_steps, lo, hi, max(1, s.eval_spec.batch_size // (spec.num_points + 1)), on_batch)
        out = rtl_per_pair(samples, num_points=spec.num_points)
        on_batch(hi - lo)
        s.timings["mrtl"] = time.time() - t0
        return out

    def combine(self, result, shares: list[torch.Tensor], s: Shard, nets) -> None:
        per_pair = torch.cat(shares)
        result.metrics["mrtl"], result.rtl_curve = summarize_rtl(per_pair)
        result.values["mrtl_pairs"] = pairs = pair_mrtl(per_pair).numpy()
        result.metrics.update(mean_interval("mrtl", pairs, **s.boot))

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"mrtl": eval_spec.mrtl.model_dump()}
