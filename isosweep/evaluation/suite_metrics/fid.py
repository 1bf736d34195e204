"""FID in the suite: every rank embeds its range of generated samples; rank 0 compares them with the dataset's
reference statistics (cached), with a bootstrap interval at screening fidelity."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from isosweep.data.datasets import build_dataset
from isosweep.data.imagefiles import DECODE_VERSION, files_fingerprint
from isosweep.evaluation.features.common import cache_dir
from isosweep.evaluation.metrics.confidence import fid_interval
from isosweep.evaluation.metrics.fid import fid_from_features, generated_features, reference_statistics
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register


@register
class Fid(Metric):
    names = ("fid",)
    needs = ("fid",)

    def share(self, s: Shard, nets) -> dict[str, Any]:
        t0, spec = time.time(), s.eval_spec
        lo, hi = s.range(spec.fid.num_samples)
        on_batch = s.started("fid", hi - lo)
        samples = s.samples(spec.fid.num_samples, spec.fid.ddim_steps, lo, hi, spec.batch_size, on_batch)
        feats, grid = generated_features(samples, nets.fid_features, keep_images=16 if s.rank == 0 else 0)
        on_batch(hi - lo)
        s.timings["fid"] = time.time() - t0
        return {"features": feats, "grid": grid}

    def combine(self, result, shares: list[dict], s: Shard, nets) -> None:
        t0 = time.time()
        feats = np.concatenate([g["features"] for g in shares])
        mu, sigma = _reference_stats(s.eval_spec, s.dataset_spec, nets.fid_features, nets.names["fid"], s.progress)
        result.metrics["fid"] = fid_from_features(feats, mu, sigma)
        if s.fid_resamples:
            result.metrics.update(fid_interval(feats, mu, sigma, resamples=s.fid_resamples, level=s.eval_spec.bootstrap.level,
                                               seed=s.eval_spec.seed))
        s.timings["fid"] += time.time() - t0

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"fid": eval_spec.fid.model_dump()}


def _reference_stats(eval_spec, dataset_spec, features: Callable, backbone: str, progress: bool):
    """The dataset's reference statistics (cached). The key holds what the images are: for shapes its size, seed and
    resolution (the images follow from them); for an image folder also `files_fingerprint` of the n files used
    (paths, sizes, mtimes), so images replaced under the same path are embedded again, not served stale."""
    dataset = build_dataset(dataset_spec, train=False)
    n = min(len(dataset), eval_spec.fid.reference_samples or len(dataset))
    key = {"kind": dataset_spec.kind, "path": dataset_spec.path, "size": dataset_spec.size if dataset_spec.kind == "shapes" else None,
           "seed": dataset_spec.seed if dataset_spec.kind == "shapes" else None, "resolution": dataset_spec.resolution,
           "center_crop": dataset_spec.center_crop, "n": n, "version": 1, "decode": DECODE_VERSION}
    if dataset_spec.kind != "shapes":
        key["files"] = files_fingerprint(dataset.root, dataset.files[:n])

    def batches():
        bs = eval_spec.batch_size
        for lo in range(0, n, bs):
            yield torch.stack([dataset[i][0] for i in range(lo, min(n, lo + bs))])

    return reference_statistics(batches(), features, backbone=backbone, dataset_key=key, cache_dir=cache_dir(eval_spec),
                                progress=progress)
