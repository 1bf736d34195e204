"""LS in the suite: every rank labels its range of generated samples with the attribute classifier (and keeps their
bottleneck h when evaluation.ls.spaces has h); rank 0 fits the SVMs on the kept samples."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from isosweep.core.sampling import initial_noise
from isosweep.evaluation.metrics.separability import classify_samples, ls_scores
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register


@register
class Ls(Metric):
    names = ("ls",)
    needs = ("ls",)

    def share(self, s: Shard, nets) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        t0, spec = time.time(), s.eval_spec
        lo, hi = s.range(spec.ls.num_samples)
        on_batch = s.started("ls", hi - lo)
        samples = s.samples(spec.ls.num_samples, spec.ls.ddim_steps, lo, hi, spec.batch_size, on_batch)
        out = classify_samples(samples, nets.classifier, capture_h="h" in spec.ls.spaces)
        on_batch(hi - lo)
        s.timings["ls_sampling"] = time.time() - t0
        return out

    def combine(self, result, shares: list[tuple], s: Shard, nets) -> None:
        t0 = time.time()
        ls, shares = s.eval_spec.ls, [g for g in shares if len(g[0])]  # in rank order: sample order
        labels, conf = np.concatenate([g[0] for g in shares]), np.concatenate([g[1] for g in shares])
        latents = {sp: initial_noise(ls.num_samples, s.shape, s.eval_spec.seed).flatten(1).numpy() if sp == "x_T"
                   else np.concatenate([g[2] for g in shares]) for sp in dict.fromkeys(ls.spaces)}
        result.metrics.update(ls_scores(latents, labels, conf, keep=ls.keep, kernels=tuple(ls.kernels), heldout=ls.heldout,
                                        seed=s.eval_spec.seed))
        s.timings["ls_sampling"] += time.time() - t0

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"ls": eval_spec.ls.model_dump()}

    def backbone(self, name: str, names: dict[str, str], eval_spec) -> str:
        return names["ls"]  # ls, ls_max, ls_rbf, ls_h, ls_h_rbf: the attribute classifier's
