"""The evaluation suite of one model (docs/math.md section 5), sharded over a trial's workers.

`evaluate_model` computes FID, PPL, mRTL (and the RTL(t) curve), MCN, VoR and LS with the feature
networks `features.resolver` resolves, plus a sample grid and slerp/lerp strips. With `world_size > 1`
(and torch.distributed initialised) every rank computes a contiguous range of the global sample, pair
and Jacobian indices; latents depend only on (seed, index), so the gathered result equals the
one-process result up to float noise. Rank 0 combines everything; all ranks return the same `EvalResult`.

Progress: besides the bars (rank 0), every rank can report how far each metric's share is to a `Progress`
callback the caller injects (the sweep layer turns it into Ray metrics; this layer imports no Ray).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from isosweep.core.losses import add_noise
from isosweep.core.names import CHEAP_FID
from isosweep.core.sampling import DDIMSampler, initial_noise
from isosweep.data.datasets import build_dataset
from isosweep.data.imagefiles import DECODE_VERSION
from isosweep.data.images import make_grid, make_strip
from isosweep.evaluation.collectives import broadcast as _broadcast
from isosweep.evaluation.collectives import distributed as _distributed
from isosweep.evaluation.collectives import gather as _gather
from isosweep.evaluation.features import resolver as bb
from isosweep.evaluation.features.common import cache_dir
from isosweep.evaluation.metrics.confidence import fid_interval, mean_interval, ppl_interval_tight, ppl_summary, vor_interval
from isosweep.evaluation.metrics.fid import fid_from_features, generated_features, reference_statistics
from isosweep.evaluation.metrics.jacobian import autodiff_context, condition_numbers, jacobian_singular_values, mcn, unet_encoder, vor
from isosweep.evaluation.metrics.paths import lerp, slerp
from isosweep.evaluation.metrics.ppl import ppl_distances, sequential_pairs
from isosweep.evaluation.metrics.rtl import pair_latents, pair_mrtl, rtl_per_pair, summarize_rtl
from isosweep.evaluation.metrics.separability import classify_samples, ls_scores
from isosweep.evaluation.record import EvalResult
from isosweep.spec import EVAL_METRICS, SweepSpec, base_metric, timestep_metric

__all__ = ["evaluate_model", "trial_evaluator", "checkpoint_fid_scorer", "shard_range", "Progress"]

_JACOBIAN_NOISE_STREAM = 6  # initial_noise stream of the noise in x_t for MCN/VoR

# Progress(share, done, total): how far this rank is with one share, at its start (done = 0), after every batch
# and at its end (done = total; an empty share reports 0 of 0). Shares and units: fid, ls and fid_cheap (the
# cheap FID of evaluation.checkpoint_fid): samples; ppl, mrtl: pairs; jacobian (MCN and VoR): samples x
# timesteps. It must not raise.
Progress = Callable[[str, int, int], None]


@dataclass
class _Shard:
    """What every metric's share needs: the model's sampler, this rank's place, and a stopwatch."""

    sampler: DDIMSampler
    unet: torch.nn.Module
    scheduler: Any
    eval_spec: Any
    dataset_spec: Any
    device: torch.device
    rank: int
    world_size: int
    progress: bool
    on_progress: Progress | None = None
    fid_resamples: int = 0  # > 0: FID gets a bootstrap interval (screening fidelity)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.sampler.sample_shape

    def range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)

    def started(self, share: str, total: int) -> Callable[[int], None]:
        """Reports `share` at 0 of `total` units; returns the per-batch callback (units done so far)."""
        if self.on_progress is None:
            return lambda done: None
        report = self.on_progress
        report(share, 0, total)
        return lambda done: report(share, done, total)


def evaluate_model(unet: torch.nn.Module, scheduler, eval_spec, dataset_spec, *, metrics: list[str] | None = None,
                   device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                   progress: bool = True, images: bool = True, on_progress: Progress | None = None,
                   fid_resamples: int = 0) -> EvalResult:
    """Evaluate one model: see the module docstring. `metrics` defaults to evaluation.metrics ("ls" gives
    ls, ls_max and, with the rbf kernel configured, ls_rbf; with h in evaluation.ls.spaces, ls_h and ls_h_rbf
    too). Progress bars only on rank 0; `on_progress` (every rank) gets each share's progress on this rank.
    images=False skips the grid and strips (the cheap FID needs none). fid_resamples > 0 adds fid_lo/fid_hi, a
    bootstrap interval over the generated images (screening fidelity: docs/metrics.md, "Screening")."""
    wanted = list(metrics if metrics is not None else eval_spec.metrics)
    unknown = set(wanted) - set(EVAL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; use any of {' '.join(EVAL_METRICS)}")
    with full_float32_matmul():
        return _evaluate(unet, scheduler, eval_spec, dataset_spec, wanted, device, rank, world_size, progress, images,
                         on_progress, fid_resamples)


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
              progress: bool, images: bool = True, on_progress: Progress | None = None, fid_resamples: int = 0) -> EvalResult:
    dist = _distributed(world_size)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    show = progress and rank == 0
    sampler = DDIMSampler(unet, scheduler, batch_size=eval_spec.batch_size, progress=show, device=device)
    shard = _Shard(sampler, unet, scheduler, eval_spec, dataset_spec, device, rank, world_size, show, on_progress, fid_resamples)
    nets = _feature_networks(shard, wanted, dist)
    partial = {name: share(shard, nets) for name, share in _SHARES.items() if _needed(name, wanted)}
    gathered = _gather(partial, dist, world_size)
    result = EvalResult(settings=_settings(eval_spec, shard.shape))
    if rank == 0 or not dist:
        _combine(result, gathered, wanted, shard, nets)
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

    def evaluate(unet, scheduler, device, rank, world_size) -> EvalResult:
        result = evaluate_model(unet, scheduler, eval_spec, spec.dataset, metrics=metrics, device=device, rank=rank,
                                world_size=world_size, progress=rank == 0, on_progress=on_progress, images=metrics is None,
                                fid_resamples=spec.evaluation.screening.fid_resamples if screen else 0)
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

    def score(unet, scheduler, device, rank, world_size) -> tuple[float, str]:
        result = evaluate_model(unet, scheduler, eval_spec, spec.dataset, metrics=["fid"], device=device, rank=rank,
                                world_size=world_size, progress=False, images=False, on_progress=renamed)
        return result.metrics["fid"], result.backbones["fid"]

    return score


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of n global indices for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# --- each metric's share on this rank -------------------------------------------------------------


def _fid_share(s: _Shard, nets) -> dict[str, Any]:
    t0, spec = time.time(), s.eval_spec
    lo, hi = s.range(spec.fid.num_samples)
    on_batch = s.started("fid", hi - lo)
    feats, grid = generated_features(s.sampler, nets.fid_features, num_samples=spec.fid.num_samples, ddim_steps=spec.fid.ddim_steps,
                                     seed=spec.seed, shape=s.shape, start=lo, stop=hi, batch_size=spec.batch_size,
                                     keep_images=16 if s.rank == 0 else 0, on_batch=on_batch)
    on_batch(hi - lo)
    s.timings["fid"] = time.time() - t0
    return {"features": feats, "grid": grid}


def _ppl_share(s: _Shard, nets) -> np.ndarray:
    """This rank's PPL pairs; with ppl.stop_width, rounds until the interval is tight (rank 0 returns them all)."""
    t0, spec = time.time(), s.eval_spec
    lo, hi = s.range(spec.ppl.num_samples)
    on_batch = s.started("ppl", hi - lo)

    def compute(a: int, b: int) -> np.ndarray:
        return ppl_distances(s.sampler, nets.distance, num_samples=spec.ppl.num_samples, ddim_steps=spec.ppl.ddim_steps,
                             eps=spec.ppl.eps, seed=spec.seed, shape=s.shape, start=a, stop=b,
                             batch_size=max(1, spec.batch_size // 2), on_batch=on_batch if spec.ppl.stop_width is None else None)

    if spec.ppl.stop_width is None:
        out = compute(lo, hi)
    else:
        out = sequential_pairs(compute, lambda v: _gather(v, _distributed(s.world_size), s.world_size),
                               num_samples=spec.ppl.num_samples, round_pairs=spec.ppl.round_pairs, rank=s.rank,
                               world_size=s.world_size, enough=lambda d: _tight(d, spec, on_batch, s.world_size))
        out = out if s.rank == 0 else out[:0]  # gathered in rank order: rank 0 holds every pair, in pair order
    on_batch(hi - lo)
    s.timings["ppl"] = time.time() - t0
    return out


def _tight(d: np.ndarray, spec, on_batch: Callable[[int], None], world_size: int) -> bool:
    """Sequential PPL's look after a round (`ppl_interval_tight`), with the progress bar moved on."""
    on_batch(len(d) // world_size)
    return ppl_interval_tight(d, stop_width=spec.ppl.stop_width, level=spec.bootstrap.level, seed=spec.seed)


def _mrtl_share(s: _Shard, nets) -> torch.Tensor:
    t0, spec = time.time(), s.eval_spec.mrtl
    lo, hi = s.range(spec.num_pairs)
    on_batch = s.started("mrtl", hi - lo)
    out = rtl_per_pair(s.sampler, num_pairs=spec.num_pairs, num_points=spec.num_points, ddim_steps=spec.ddim_steps,
                       seed=s.eval_spec.seed, shape=s.shape, start=lo, stop=hi,
                       pairs_per_batch=max(1, s.eval_spec.batch_size // (spec.num_points + 1)), on_batch=on_batch)
    on_batch(hi - lo)
    s.timings["mrtl"] = time.time() - t0
    return out


def _jacobian_share(s: _Shard, nets) -> dict[int, torch.Tensor]:
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


def _ls_share(s: _Shard, nets) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t0, spec = time.time(), s.eval_spec
    lo, hi = s.range(spec.ls.num_samples)
    on_batch = s.started("ls", hi - lo)
    out = classify_samples(s.sampler, nets.classifier, num_samples=spec.ls.num_samples, ddim_steps=spec.ls.ddim_steps,
                           seed=spec.seed, shape=s.shape, start=lo, stop=hi, batch_size=spec.batch_size,
                           capture_h="h" in spec.ls.spaces, on_batch=on_batch)
    on_batch(hi - lo)
    s.timings["ls_sampling"] = time.time() - t0
    return out


# name of the share -> how to compute it; "jacobian" serves both MCN and VoR
_SHARES: dict[str, Callable[[_Shard, Any], Any]] = {
    "fid": _fid_share, "ppl": _ppl_share, "mrtl": _mrtl_share, "jacobian": _jacobian_share, "ls": _ls_share}


def _needed(share: str, wanted: list[str]) -> bool:
    return ("mcn" in wanted or "vor" in wanted) if share == "jacobian" else share in wanted


def _jacobian_inputs(lo: int, hi: int, s: _Shard) -> tuple[torch.Tensor, torch.Tensor]:
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
        for lo in tqdm(range(0, x.shape[0], group), desc="Jacobians", disable=not progress, leave=False):
            xb = x[lo : lo + group].to(device)
            out.append(jacobian_singular_values(enc, xb, pool=spec.pool, memory_budget_mb=spec.memory_budget_mb // 2).cpu())
            if on_batch is not None:
                on_batch(lo + xb.shape[0])
    return torch.cat(out)


# --- combining on rank 0 --------------------------------------------------------------------------


def _feature_networks(s: _Shard, wanted: list[str], dist: bool):
    """Rank 0 loads first, so a cache miss trains/computes once; the other ranks then read the cache."""
    needs = tuple(m for m in ("fid", "ppl", "ls") if m in wanted)
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


def _combine(result: EvalResult, gathered: list[dict], wanted: list[str], s: _Shard, nets) -> None:
    """Rank 0: turn every rank's share into the final numbers."""
    names = nets.names if nets else bb.metric_backbone_names("standard", s.dataset_spec.kind)
    if "fid" in wanted:
        t0 = time.time()
        feats = np.concatenate([g["fid"]["features"] for g in gathered])
        mu, sigma = _reference_stats(s.eval_spec, s.dataset_spec, nets.fid_features, names["fid"], s.progress)
        result.metrics["fid"] = fid_from_features(feats, mu, sigma)
        if s.fid_resamples:
            result.metrics.update(fid_interval(feats, mu, sigma, resamples=s.fid_resamples, level=s.eval_spec.bootstrap.level,
                                               seed=s.eval_spec.seed))
        s.timings["fid"] += time.time() - t0
    boot = {"resamples": s.eval_spec.bootstrap.resamples, "level": s.eval_spec.bootstrap.level, "seed": s.eval_spec.seed}
    if "ppl" in wanted:
        result.values["ppl_pairs"] = d = np.concatenate([g["ppl"] for g in gathered])  # pair order: ranks hold ranges
        result.metrics.update(ppl_summary(d, **boot))
        if s.eval_spec.ppl.stop_width is not None:  # sequential: how many pairs it took
            result.metrics["ppl_n"] = float(len(d))
    if "mrtl" in wanted:
        per_pair = torch.cat([g["mrtl"] for g in gathered])
        result.metrics["mrtl"], result.rtl_curve = summarize_rtl(per_pair)
        result.values["mrtl_pairs"] = pairs = pair_mrtl(per_pair).numpy()
        result.metrics.update(mean_interval("mrtl", pairs, **boot))
    if _needed("jacobian", wanted):
        _combine_jacobians(result, gathered, wanted, s.eval_spec.jacobian, boot)
    if "ls" in wanted:
        t0 = time.time()
        ls, shares = s.eval_spec.ls, [g["ls"] for g in gathered if len(g["ls"][0])]  # in rank order: sample order
        labels, conf = np.concatenate([g[0] for g in shares]), np.concatenate([g[1] for g in shares])
        latents = {sp: initial_noise(ls.num_samples, s.shape, s.eval_spec.seed).flatten(1).numpy() if sp == "x_T"
                   else np.concatenate([g[2] for g in shares]) for sp in dict.fromkeys(ls.spaces)}
        result.metrics.update(ls_scores(latents, labels, conf, keep=ls.keep, kernels=tuple(ls.kernels), heldout=ls.heldout,
                                        seed=s.eval_spec.seed))
        s.timings["ls_sampling"] += time.time() - t0
    for name in result.metrics:
        if base_metric(name) == name or name.startswith("ls"):  # interval bounds and further t: their metric's
            result.backbones[name] = names["ls" if name.startswith("ls") else name]
    if "vor" in result.backbones:  # VoR's numbers depend on its normalisation: name it (docs/metrics.md)
        result.backbones["vor"] = f"norm-{s.eval_spec.jacobian.vor_norm}"


def _combine_jacobians(result: EvalResult, gathered: list[dict], wanted: list[str], spec, boot: dict) -> None:
    """MCN and VoR with their intervals at every timestep: `mcn`/`vor` at the first, `mcn_t<t>`/`vor_t<t>` after."""
    for i, t in enumerate(spec.timesteps):
        svals = torch.cat([g["jacobian"][t] for g in gathered if g["jacobian"][t].numel()])
        mcn_name, vor_name = ("mcn", "vor") if i == 0 else (timestep_metric("mcn", t), timestep_metric("vor", t))
        if "mcn" in wanted:
            result.values[f"{mcn_name}_samples"] = cond = condition_numbers(svals).numpy()
            result.metrics[mcn_name] = mcn(svals)
            result.metrics.update(mean_interval(mcn_name, cond, **boot))
        if "vor" in wanted:
            result.metrics[vor_name] = vor(svals, spec.vor_norm)
            result.metrics.update(vor_interval(vor_name, svals.numpy(), spec.vor_norm, **boot))


def _add_images(result: EvalResult, gathered: list[dict], s: _Shard, nets) -> None:
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


def _reference_stats(eval_spec, dataset_spec, features: Callable, backbone: str, progress: bool):
    dataset = build_dataset(dataset_spec, train=False)
    n = min(len(dataset), eval_spec.fid.reference_samples or len(dataset))
    key = {"kind": dataset_spec.kind, "path": dataset_spec.path, "size": dataset_spec.size if dataset_spec.kind == "shapes" else None,
           "seed": dataset_spec.seed if dataset_spec.kind == "shapes" else None, "resolution": dataset_spec.resolution,
           "center_crop": dataset_spec.center_crop, "n": n, "version": 1, "decode": DECODE_VERSION}

    def batches():
        bs = eval_spec.batch_size
        for lo in range(0, n, bs):
            yield torch.stack([dataset[i][0] for i in range(lo, min(n, lo + bs))])

    return reference_statistics(batches(), features, backbone=backbone, dataset_key=key, cache_dir=cache_dir(eval_spec),
                                progress=progress)


def _settings(eval_spec, shape) -> dict[str, Any]:
    return {"seed": eval_spec.seed, "backbone": eval_spec.backbone, "sample_shape": list(shape), "tf32": False,
            "fid": eval_spec.fid.model_dump(), "ppl": eval_spec.ppl.model_dump(), "mrtl": eval_spec.mrtl.model_dump(),
            "jacobian": eval_spec.jacobian.model_dump(), "ls": eval_spec.ls.model_dump(),
            "bootstrap": eval_spec.bootstrap.model_dump()}
