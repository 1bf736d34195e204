"""DDIM inversion round trips in the suite (optional: evaluation.metrics names inversion_mse and/or
inversion_perceptual): every rank inverts its range of the dataset's first evaluation.inversion.num_images images
and draws them again from their x_T, as `isosweep invert` does; rank 0 gives each number with its bootstrap
interval over the images (docs/editing.md, "Inversion as evaluation metrics")."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from isosweep.core.inversion import ddim_invert
from isosweep.data.datasets import build_dataset
from isosweep.data.images import round_trip_grid, to_uint8
from isosweep.evaluation.features.common import NO_BACKBONE
from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register


@register
class Inversion(Metric):
    names = ("inversion_mse", "inversion_perceptual")
    needs = ("ppl",)  # the perceptual distance is PPL's (and `isosweep invert`'s)

    @property
    def key(self) -> str:
        return "inversion"

    def share(self, s: Shard, nets) -> dict[str, np.ndarray]:
        """This rank's images: each one's reconstruction MSE and perceptual distance, and those the strip shows."""
        t0, spec, bs = time.time(), s.eval_spec.inversion, s.eval_spec.batch_size
        lo, hi = s.range(spec.num_images)
        on_batch = s.started("inversion", hi - lo)
        dataset = build_dataset(s.dataset_spec, train=False)  # unflipped, as FID's reference images
        if spec.num_images > len(dataset):  # checked on every rank, so that all stop, not only the last
            raise ValueError(f"field 'evaluation.inversion.num_images': {spec.num_images} is more than the dataset's "
                             f"{len(dataset)} images; fix: lower it")
        mse, perceptual, originals, redraws = [], [], [], []
        for start in range(lo, hi, bs):
            images = torch.stack([dataset[i][0] for i in range(start, min(hi, start + bs))])
            x_T = ddim_invert(s.unet, s.scheduler, images, spec.ddim_steps, refine=spec.refine, batch_size=bs,
                              progress=False, device=s.device)
            redrawn = s.sampler(x_T, spec.ddim_steps).images
            mse.append(((redrawn.double() - images.double()) ** 2).flatten(1).mean(dim=1).numpy())
            perceptual.append(nets.distance(images, redrawn).double().cpu().numpy())
            keep = max(0, min(len(images), spec.shown - start))  # the strip's images: global indices < shown
            originals.append(to_uint8(images[:keep].numpy()))
            redraws.append(to_uint8(redrawn[:keep].numpy()))
            on_batch(min(hi, start + bs) - lo)
        s.timings["inversion"] = time.time() - t0
        empty = np.zeros(0, np.float64)
        return {"mse": np.concatenate(mse) if mse else empty, "perceptual": np.concatenate(perceptual) if perceptual else empty,
                "originals": np.concatenate(originals) if originals else None, "redrawn": np.concatenate(redraws) if redraws else None}

    def combine(self, result, shares: list[dict], s: Shard, nets) -> None:
        per_image = {"inversion_mse": np.concatenate([g["mse"] for g in shares]),  # rank order: image order
                     "inversion_perceptual": np.concatenate([g["perceptual"] for g in shares])}
        for name, values in per_image.items():
            if name not in s.metrics:
                continue
            result.values[f"{name}_samples"] = values
            result.metrics[name] = float(np.mean(values))
            result.metrics.update(mean_interval(name, values, **s.boot))
        originals = [g["originals"] for g in shares if g["originals"] is not None and len(g["originals"])]
        if originals:  # top row: the dataset's images; bottom row: drawn again from their x_T
            redrawn = np.concatenate([g["redrawn"] for g in shares if g["redrawn"] is not None])
            result.images["inversion_strip"] = np.asarray(round_trip_grid(np.concatenate(originals), redrawn))

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"inversion": eval_spec.inversion.model_dump()}

    def backbone(self, name: str, names: dict[str, str], eval_spec) -> str:
        return NO_BACKBONE if name == "inversion_mse" else names.get("ppl", NO_BACKBONE)
