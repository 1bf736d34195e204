"""MCN and VoR in the suite: one share (the singular values of the encoder Jacobian of every rank's samples at
every evaluation.jacobian.timesteps) serves both; rank 0 gives each with its interval at every timestep."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from isosweep.core.progress import progress_bar
from isosweep.core.losses import add_noise
from isosweep.core.sampling import initial_noise
from isosweep.data.datasets import build_dataset
from isosweep.evaluation.metrics.confidence import mean_interval, vor_interval
from isosweep.evaluation.metrics.jacobian import autodiff_context, condition_numbers, jacobian_singular_values, mcn, unet_encoder, vor
from isosweep.evaluation.suite_metrics.base import Metric, Shard, register
from isosweep.spec import timestep_metric

_JACOBIAN_NOISE_STREAM = 6  # initial_noise stream of the noise in x_t for MCN/VoR


@register
class Jacobian(Metric):
    names = ("mcn", "vor")

    @property
    def key(self) -> str:
        return "jacobian"

    def share(self, s: Shard, nets) -> dict[int, torch.Tensor]:
        """{t: singular values (n, k)} at every evaluation.jacobian.timesteps, for this rank's samples."""
        t0 = time.time()
        lo, hi = s.range(s.eval_spec.jacobian.num_samples)
        timesteps = s.eval_spec.jacobian.timesteps
        on_batch = s.started("jacobian", (hi - lo) * len(timesteps))
        x0, eps = _jacobian_inputs(lo, hi, s)
        out = {}
        for i, t in enumerate(timesteps):
            x = add_noise(x0, eps, torch.full((hi - lo,), t, dtype=torch.long), s.scheduler.alphas_cumprod)
            out[t] = _jacobian_svals(s.unet, x, s.eval_spec, s.device, s.progress, t,
                                     on_batch=lambda done, before=i * (hi - lo): on_batch(before + done))
        on_batch((hi - lo) * len(timesteps))
        s.timings["jacobian"] = time.time() - t0
        return out

    def combine(self, result, shares: list[dict], s: Shard, nets) -> None:
        """MCN and VoR with their intervals at every timestep: `mcn`/`vor` at the first, `mcn_t<t>`/`vor_t<t>` after."""
        spec, boot = s.eval_spec.jacobian, s.boot
        for i, t in enumerate(spec.timesteps):
            svals = torch.cat([g[t] for g in shares if g[t].numel()])
            mcn_name, vor_name = ("mcn", "vor") if i == 0 else (timestep_metric("mcn", t), timestep_metric("vor", t))
            if "mcn" in s.metrics:
                result.values[f"{mcn_name}_samples"] = cond = condition_numbers(svals).numpy()
                result.metrics[mcn_name] = mcn(svals)
                result.metrics.update(mean_interval(mcn_name, cond, **boot))
            if "vor" in s.metrics:
                result.metrics[vor_name] = vor(svals, spec.vor_norm)
                result.metrics.update(vor_interval(vor_name, svals.numpy(), spec.vor_norm, **boot))

    def settings(self, eval_spec) -> dict[str, Any]:
        return {"jacobian": eval_spec.jacobian.model_dump()}

    def backbone(self, name: str, names: dict[str, str], eval_spec) -> str:
        """VoR's numbers depend on its normalisation: name it (docs/metrics.md)."""
        return f"norm-{eval_spec.jacobian.vor_norm}" if name == "vor" else super().backbone(name, names, eval_spec)


def _jacobian_inputs(lo: int, hi: int, s: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) of Jacobian samples lo..hi-1, the same at every t (docs/math.md section 1: x_t = add_noise(x_0,
    eps, t)): x_0 = dataset image perm[i] (a permutation seeded by evaluation.seed), eps from initial_noise
    stream 6."""
    steps = len(s.scheduler.alphas_cumprod)
    bad = [t for t in s.eval_spec.jacobian.timesteps if not 0 <= t < steps]
    if bad:
        raise ValueError(f"evaluation.jacobian.timesteps {bad} outside the model's schedule [0, {steps - 1}]")
    dataset = build_dataset(s.dataset_spec, train=False)
    perm = np.random.default_rng(s.eval_spec.seed).permutation(len(dataset))
    if hi <= lo:
        return torch.zeros((0, *s.shape)), torch.zeros((0, *s.shape))
    x0 = torch.stack([dataset[int(perm[i % len(dataset)])][0] for i in range(lo, hi)])
    if s.codec is not None:  # a latent model: the encoder's input space is the codec's latents
        x0 = s.codec.encode(x0.to(s.device)).cpu()
    return x0, initial_noise(hi - lo, s.shape, s.eval_spec.seed, start=lo, stream=_JACOBIAN_NOISE_STREAM)


def _jacobian_svals(unet, x: torch.Tensor, eval_spec, device, progress: bool, t: int,
                    on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Singular values (n, k) of the pooled encoder Jacobian at x (at timestep t), samples grouped to fit the budget;
    `on_batch(done)` after each group with the samples of x done so far."""
    spec = eval_spec.jacobian
    enc = unet_encoder(unet, t)
    if x.shape[0] == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    with torch.no_grad():
        m = enc(x[:1].to(device)).numel()
    m_pooled = m // (spec.pool**2) if spec.pool else m
    per_sample = 4 * m_pooled * x[0].numel()  # bytes of one float32 Jacobian
    group = int(max(1, min(eval_spec.batch_size, (spec.memory_budget_mb * 2**20 // 2) // per_sample)))
    out = []
    with autodiff_context(unet):
        for lo in progress_bar(range(0, x.shape[0], group), desc="Jacobians", disable=not progress, leave=False):
            xb = x[lo : lo + group].to(device)
            out.append(jacobian_singular_values(enc, xb, pool=spec.pool, memory_budget_mb=spec.memory_budget_mb // 2).cpu())
            if on_batch is not None:
                on_batch(lo + xb.shape[0])
    return torch.cat(out)
