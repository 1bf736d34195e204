"""The evaluation suite of one model (docs/math.md section 5), sharded over a trial's workers.

`evaluate_model` computes the metrics evaluation.metrics names, each a registered `suite_metrics.Metric` (FID, PPL,
mRTL and the RTL(t) curve, MCN and VoR, LS, and any added one), with the feature networks `features.resolver`
resolves, plus a sample grid and slerp/lerp strips. With `world_size > 1`
(and torch.distributed initialised) every rank computes a contiguous range of the global sample, pair
and Jacobian indices; latents depend only on (seed, index), so the gathered result equals the
one-process result up to float noise. Rank 0 combines everything (`Metric.combine`); all ranks return the same
`EvalResult`. This module is the rank-and-gather loop; what a metric computes is in its module of suite_metrics/.

Progress: besides the bars (rank 0), every rank can report how far each metric's share is to a `Progress`
callback the caller injects (the sweep layer turns it into Ray metrics; this layer imports no Ray).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from isosweep.core.names import CHEAP_FID
from isosweep.core.codec import Codec
from isosweep.core.sampling import DDIMSampler, initial_noise
from isosweep.data.images import make_grid, make_strip
from isosweep.evaluation.collectives import broadcast as _broadcast
from isosweep.evaluation.collectives import distributed as _distributed
from isosweep.evaluation.collectives import gather as _gather
from isosweep.evaluation.features import resolver as bb
from isosweep.evaluation.features.common import private_weights_dir
from isosweep.evaluation.metrics.paths import lerp, slerp
from isosweep.evaluation.metrics.rtl import pair_latents
from isosweep.evaluation.record import EvalResult
from isosweep.evaluation.suite_metrics import REGISTRY, Metric, Progress, Shard, selected, shard_range
from isosweep.spec import SweepSpec, base_metric

__all__ = ["evaluate_model", "trial_evaluator", "checkpoint_fid_scorer", "shard_range", "Progress"]


def evaluate_model(unet: torch.nn.Module, scheduler, eval_spec, dataset_spec, *, metrics: list[str] | None = None,
                   device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                   progress: bool = True, images: bool = True, on_progress: Progress | None = None,
                   fid_resamples: int = 0, codec: Codec | None = None) -> EvalResult:
    """Evaluate one model: see the module docstring. `metrics` defaults to evaluation.metrics ("ls" gives
    ls, ls_max and, with the rbf kernel configured, ls_rbf; with h in evaluation.ls.spaces, ls_h and ls_h_rbf
    too). Progress bars only on rank 0; `on_progress` (every rank) gets each share's progress on this rank.
    images=False skips the grid and strips (the cheap FID needs none). fid_resamples > 0 adds fid_lo/fid_hi, a
    bootstrap interval over the generated images (screening fidelity: docs/metrics.md, "Screening"). With a `codec` (a
    latent model) the generated images are its decoded samples and the UNet's metrics (MCN, VoR, mRTL) are taken in
    latent space, on encoded dataset images where they start from images."""
    wanted = list(metrics if metrics is not None else eval_spec.metrics)
    with full_float32_matmul():
        return _evaluate(unet, scheduler, eval_spec, dataset_spec, wanted, device, rank, world_size, progress, images,
                         on_progress, fid_resamples, codec)


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions while metrics are computed, restored afterwards.

    cuDNN and cuBLAS use TF32 (a 10-bit mantissa) by default on Ampere and later: coarser than PPL's
    finite difference at eps = 1e-4, and enough to move FID in its last digits between cards. Every
    evaluation records `settings["tf32"] = False`.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _evaluate(unet, scheduler, eval_spec, dataset_spec, wanted: list[str], device, rank: int, world_size: int,
              progress: bool, images: bool = True, on_progress: Progress | None = None, fid_resamples: int = 0,
              codec: Codec | None = None) -> EvalResult:
    dist = _distributed(world_size)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    show = progress and rank == 0
    sampler = DDIMSampler(unet, scheduler, batch_size=eval_spec.batch_size, progress=show, device=device, codec=codec)
    shard = Shard(sampler, unet, scheduler, eval_spec, dataset_spec, device, rank, world_size, show, on_progress, fid_resamples,
                  metrics=tuple(wanted), codec=codec)
    chosen = selected(wanted)
    nets = _feature_networks(shard, chosen, dist)
    partial = {metric.key: metric.share(shard, nets) for metric in chosen}
    gathered = _gather(partial, dist, world_size)
    result = EvalResult(settings=_settings(eval_spec, shard.shape))
    if codec is not None:  # sample_shape is then the latents'; the images are their decoding
        result.settings["autoencoder"] = type(codec.module).__name__ if codec.module is not None else "identity"
    if rank == 0 or not dist:
        _combine(result, gathered, chosen, shard, nets)
        if images:
            _add_images(result, gathered, shard, nets)
        result.timings = {k: round(v, 3) for k, v in shard.timings.items()}
    return _broadcast(result, dist)


def trial_evaluator(spec: SweepSpec, on_progress: Progress | None = None, *, full: bool = False,
                    metrics: list[str] | None = None) -> Callable[[torch.nn.Module, Any, torch.device, int, int], EvalResult]:
    """The `training.loop.Evaluator` of a trial: the spec's evaluation suite on the trial's model (the final EMA
    weights, or with evaluation.checkpoint_fid those of the step with the lowest cheap FID), reporting to
    `on_progress` (this worker's rank) if given. With evaluation.screening it runs at screening fidelity (FID with
    an interval) unless `full`; the record's settings say which (`fidelity`: screen or full)."""
    screen = spec.evaluation.screening is not None and not full
    eval_spec = spec.evaluation.screened() if screen else spec.evaluation

    def evaluate(unet, scheduler, device, rank, world_size, codec=None) -> EvalResult:
        result = evaluate_model(unet, scheduler, eval_spec, spec.dataset, metrics=metrics, device=device, rank=rank,
                                world_size=world_size, progress=rank == 0, on_progress=on_progress, images=metrics is None,
                                fid_resamples=spec.evaluation.screening.fid_resamples if screen else 0, codec=codec)
        result.settings["fidelity"] = "screen" if screen else "full"
        return result

    return evaluate


def checkpoint_fid_scorer(spec: SweepSpec, on_progress: Progress | None = None
                          ) -> Callable[[torch.nn.Module, Any, torch.device, int, int], tuple[float, str]]:
    """The `training.best_step.Scorer` of a trial: FID with evaluation.checkpoint_fid's sample count and DDIM
    steps, otherwise exactly the final FID (backbone, reference statistics, seed, sharding over the ranks).
    Returns (FID, backbone name) on every rank; its progress goes to `on_progress` as the share `fid_cheap`."""
    cheap = spec.evaluation.checkpoint_fid
    fid = spec.evaluation.fid.model_copy(update={"num_samples": cheap.num_samples, "ddim_steps": cheap.ddim_steps})
    eval_spec = spec.evaluation.model_copy(update={"fid": fid})
    renamed = None if on_progress is None else (lambda share, done, total: on_progress(CHEAP_FID, done, total))

    def score(unet, scheduler, device, rank, world_size, codec=None) -> tuple[float, str]:
        result = evaluate_model(unet, scheduler, eval_spec, spec.dataset, metrics=["fid"], device=device, rank=rank,
                                world_size=world_size, progress=False, images=False, on_progress=renamed, codec=codec)
        return result.metrics["fid"], result.backbones["fid"]

    return score


# --- the networks, the images and the settings ----------------------------------------------------


def _feature_networks(s: Shard, metrics: list[Metric], dist: bool):
    """Rank 0 loads first, so a cache miss trains/computes once; the other ranks then read the cache."""
    needs = tuple(dict.fromkeys(n for m in metrics for n in m.needs))
    if not needs:
        return None
    nets = None
    if s.rank == 0 or not dist:
        nets = bb.load_feature_networks(s.eval_spec, s.dataset_spec, needs=needs, device=s.device, progress=s.progress)
    if dist:
        torch.distributed.barrier()
    if nets is None:
        nets = bb.load_feature_networks(s.eval_spec, s.dataset_spec, needs=needs, device=s.device, progress=False)
    return nets


def _combine(result: EvalResult, gathered: list[dict], metrics: list[Metric], s: Shard, nets) -> None:
    """Rank 0: turn every rank's share into the final numbers, and name the network behind each metric."""
    for metric in metrics:
        metric.combine(result, [g[metric.key] for g in gathered], s, nets)
    names = nets.names if nets else bb.metric_backbone_names("standard", s.dataset_spec.kind, s.eval_spec.weights_dir,
                                                              private_weights_dir(s.eval_spec))
    owner = {n: m for m in metrics for n in m.names}
    for name in result.metrics:
        base = base_metric(name)
        if (base == name or name.startswith("ls")) and base in owner:  # interval bounds and further t: their metric's
            result.backbones[name] = owner[base].backbone(base, names, s.eval_spec)


def _add_images(result: EvalResult, gathered: list[dict], s: Shard, nets) -> None:
    """The sample grid (FID's first 16 samples when FID ran) and the slerp/lerp strips of mRTL's first pair."""
    t0 = time.time()
    grid = gathered[0]["fid"]["grid"] if "fid" in gathered[0] else None
    if grid is None:
        grid = s.sampler(initial_noise(16, s.shape, s.eval_spec.seed), s.eval_spec.fid.ddim_steps).images
    result.images["samples"] = np.asarray(make_grid(grid.numpy()).convert("RGB"))
    distance = nets.distance if nets is not None and nets.distance is not None else _pixel_distance
    result.backbones["frame_distances"] = nets.names["ppl"] if distance is not _pixel_distance else "pixel-rms"
    a, b = pair_latents(1, s.shape, s.eval_spec.seed)
    frames = torch.linspace(0, 1, 9, dtype=torch.float64)
    for mode, path in (("slerp", slerp), ("lerp", lerp)):
        imgs = s.sampler(torch.cat([path(a, b, frames[k : k + 1]) for k in range(len(frames))]), s.eval_spec.fid.ddim_steps).images
        result.images[f"{mode}_strip"] = np.asarray(make_strip(imgs.numpy()).convert("RGB"))
        result.frame_distances[mode] = [float(v) for v in distance(imgs[:-1], imgs[1:])]
    s.timings["images"] = time.time() - t0


def _pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


def _settings(eval_spec, shape) -> dict[str, Any]:
    """What changes the numbers: the common settings, every registered metric's (asked for or not), the bootstrap's."""
    out = {"seed": eval_spec.seed, "backbone": eval_spec.backbone, "sample_shape": list(shape), "tf32": False}
    for metric in dict.fromkeys(REGISTRY.values()):
        out.update(metric.settings(eval_spec))
    return {**out, "bootstrap": eval_spec.bootstrap.model_dump()}
