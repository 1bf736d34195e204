"""Local Basis edits in the suite (optional: evaluation.metrics names edit_linearity, edit_straightness and/or
edit_consistency): every rank edits its range of samples as `isosweep edit` does (evaluation.edit); rank 0 gives
each number with its bootstrap interval over samples (docs/editing.md, "What the numbers mean")."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from isosweep.core.editing import edit_step_index
from isosweep.core.sampling import ddim_scheduler, initial_noise
from isosweep.data.images import make_grid, to_uint8
from isosweep.evaluation.features.common import NO_BACKBONE
from isosweep.evaluation.metrics.confidence import mean_interval
from isosweep.evaluation.metrics.editing import agreement_per_sample, chance_agreement, edit_sample
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register

_EDIT_NOISE_STREAM = 8  # initial_noise stream of the edited samples' x_T


@register
class Edit(Metric):
    names = ("edit_linearity", "edit_straightness", "edit_consistency")
    results = ("edit_chance_consistency",)
    needs = ("ppl",)  # linearity and straightness measure with PPL's perceptual distance

    @property
    def key(self) -> str:
        return "edit"

    def share(self, s: Shard, nets) -> dict[str, np.ndarray]:
        """This rank's samples: each one's mean linearity and straightness over its directions, and its directions."""
        t0, spec = time.time(), s.eval_spec.edit
        if s.codec is not None:
            raise ValueError("evaluation.metrics: the Local Basis edit metrics (edit_*) do not handle latent diffusion "
                             "models yet; remove them from the spec's evaluation.metrics")
        lo, hi = s.range(spec.num_samples)
        on_batch = s.started("edit", hi - lo)
        ddim = ddim_scheduler(s.scheduler, spec.ddim_steps)
        timesteps = [int(t) for t in ddim.timesteps]
        at = edit_step_index(timesteps, spec.t)
        gammas = np.linspace(-spec.gamma, spec.gamma, spec.columns)
        x_T = initial_noise(hi - lo, s.shape, s.eval_spec.seed, start=lo, stream=_EDIT_NOISE_STREAM)
        linearity, straight, bases, picture = [], [], [], None
        for i in range(hi - lo):
            sample = edit_sample(s.unet, ddim, timesteps, at, x_T[i : i + 1].to(s.device), spec.directions,
                                 range(spec.directions), gammas, nets.distance, iterations=spec.iterations,
                                 batch_size=s.eval_spec.batch_size)
            linearity.append(np.nanmean([r["linearity_r2"] for r in sample.rows]))
            straight.append(np.nanmean([r["straightness"] for r in sample.rows]))
            bases.append(sample.basis.directions.float().cpu().numpy())
            if lo + i == 0:  # sample 0's grid: the report shows it for the baseline and the champion
                tiles = to_uint8(sample.grid.reshape(-1, *sample.grid.shape[2:]).numpy())
                picture = np.asarray(make_grid(tiles, ncols=spec.columns).convert("RGB"))
            on_batch(i + 1)
        s.timings["edit"] = time.time() - t0
        empty = np.zeros((0, spec.directions, *s.shape), np.float32)
        return {"linearity": np.asarray(linearity, np.float64), "straightness": np.asarray(straight, np.float64),
                "bases": np.stack(bases) if bases else empty, "grid": picture}

    def combine(self, result, shares: list[dict], s: Shard, nets) -> None:
        bases = np.concatenate([g["bases"] for g in shares])  # rank order: sample order
        per_sample = {"edit_linearity": np.concatenate([g["linearity"] for g in shares]),
                      "edit_straightness": np.concatenate([g["straightness"] for g in shares]),
                      "edit_consistency": agreement_per_sample([torch.from_numpy(b) for b in bases])}
        for name, values in per_sample.items():
            if name not in s.metrics:
                continue
            result.values[f"{name}_samples"] = values
            result.metrics[name] = float(np.nanmean(values))
            if np.isfinite(values).all():
                result.metrics.update(mean_interval(name, values, **s.boot))
        grids = [g["grid"] for g in shares if g["grid"] is not None]
        if grids:
            result.images["edit_grid"] = grids[0]  # rows: directions 0, 1, ...; columns: -gamma .. gamma
        if "edit_consistency" in s.metrics:
            result.metrics["edit_chance_consistency"] = chance_agreement(bases.shape[1], int(np.prod(bases.shape[2:])))

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"edit": eval_spec.edit.model_dump()}

    def backbone(self, name: str, names: dict[str, str], eval_spec) -> str:
        return NO_BACKBONE if name.startswith("edit_consistency") or name == "edit_chance_consistency" else names.get("ppl", NO_BACKBONE)
