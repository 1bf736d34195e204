"""The evaluation suite of one model (MATH.md section 5), sharded over a trial's workers; `isosweep eval`.

`evaluate_model` computes FID, PPL, mRTL (and the RTL(t) curve), MCN, VoR and LS with the feature
networks `isosweep.backbones` resolves, plus a sample grid and slerp/lerp strips. With `world_size > 1`
(and torch.distributed initialised) every rank computes a contiguous range of the global sample, pair and
Jacobian indices; latents depend only on (seed, index), so the gathered result equals the one-process
result up to float noise. Rank 0 combines everything; all ranks return the same `EvalResult`.

This module imports neither Ray nor MLflow at module level (MLflow only inside `eval_command`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from isosweep import backbones as bb
from isosweep.metrics.fid import fid_from_features, generated_features, reference_statistics
from isosweep.metrics.jacobian import autodiff_context, jacobian_singular_values, mcn, unet_encoder, vor
from isosweep.metrics.paths import lerp, slerp
from isosweep.metrics.ppl import filtered_mean, ppl_distances
from isosweep.metrics.rtl import pair_latents, rtl_per_pair, summarize_rtl
from isosweep.metrics.separability import classify_samples, ls_scores
from isosweep.sampling import DDIMSampler, initial_noise

__all__ = ["EvalResult", "evaluate_model", "eval_command", "format_row", "shard_range"]

METRIC_ORDER = ("fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_rbf")
_JACOBIAN_NOISE_STREAM = 6  # initial_noise stream of the noise in x_t for MCN/VoR


@dataclass
class EvalResult:
    """One model's evaluation.

    metrics: {fid, ppl, mrtl, mcn, vor, ls, ls_rbf} (those computed). backbones: metric -> name of the
    network behind it (values with different names are not comparable). rtl_curve: RTL(t) per DDIM step,
    high noise first. images: uint8 (H, W, 3) arrays: `samples` (grid), `slerp_strip`, `lerp_strip` (the
    same pair of latents). frame_distances: {'slerp', 'lerp'}: distance between consecutive strip frames
    (network named in backbones['frame_distances']). timings: seconds per metric. settings: what
    changes the numbers (counts, steps, eps, seed, pool, t).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    backbones: dict[str, str] = field(default_factory=dict)
    rtl_curve: list[float] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    frame_distances: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def keyed_metrics(self) -> dict[str, float]:
        """Metrics keyed with their backbone, e.g. 'fid[inception-v3-clean]', for logging side by side."""
        return {f"{k}[{self.backbones.get(k, 'none')}]": v for k, v in self.metrics.items()}


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of n global indices for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _distributed(world_size: int) -> bool:
    if world_size <= 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised; initialise the "
                           "process group first (Ray Train does) or pass world_size=1")
    return True


def _gather(obj: Any, dist: bool, world_size: int) -> list[Any]:
    """Every rank's obj, in rank order (all ranks get the list)."""
    if not dist:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _jacobian_inputs(lo: int, hi: int, eval_spec, dataset, scheduler, shape) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for Jacobian samples lo..hi-1 (MATH.md section 1):
    x_0 = dataset image perm[i] (a permutation seeded by evaluation.seed), eps from initial_noise stream 6."""
    t = eval_spec.jacobian.timestep
    abar = float(scheduler.alphas_cumprod[t])
    perm = np.random.default_rng(eval_spec.seed).permutation(len(dataset))
    x0 = torch.stack([dataset[int(perm[i % len(dataset)])][0] for i in range(lo, hi)]) if hi > lo else torch.zeros((0, *shape))
    eps = initial_noise(hi - lo, shape, eval_spec.seed, start=lo, stream=_JACOBIAN_NOISE_STREAM)
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps


def _jacobian_svals(unet, x: torch.Tensor, eval_spec, device, progress: bool) -> torch.Tensor:
    """Singular values (n, k) of the pooled encoder Jacobian at x, samples grouped to fit the budget."""
    from tqdm.auto import tqdm

    spec = eval_spec.jacobian
    enc = unet_encoder(unet, spec.timestep)
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
    return torch.cat(out)


def _to_uint8_image(pil) -> np.ndarray:
    a = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    return a


def _strips(sampler: DDIMSampler, shape, seed: int, steps: int, distance, frames: int = 9) -> tuple[dict, dict]:
    """Slerp and lerp strips between the ends of pair 0 (mRTL's first pair), and consecutive-frame distances."""
    from isosweep.images import make_strip

    a, b = pair_latents(1, shape, seed)
    s = torch.linspace(0, 1, frames, dtype=torch.float64)
    images, dists = {}, {}
    for mode, fn in (("slerp", slerp), ("lerp", lerp)):
        pts = torch.cat([fn(a, b, s[k : k + 1]) for k in range(frames)])
        imgs = sampler(pts, steps).images
        images[f"{mode}_strip"] = _to_uint8_image(make_strip(imgs.numpy()))
        dists[mode] = [float(v) for v in distance(imgs[:-1], imgs[1:])]
    return images, dists


def _pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


def evaluate_model(
    unet: torch.nn.Module,
    scheduler,
    eval_spec,
    dataset_spec,
    *,
    metrics: list[str] | None = None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Evaluate one model: see the module docstring. `metrics` defaults to evaluation.metrics ("ls" gives
    ls and, with the rbf kernel configured, ls_rbf). Progress bars only on rank 0."""
    wanted = list(metrics if metrics is not None else eval_spec.metrics)
    unknown = set(wanted) - {"fid", "ppl", "mrtl", "mcn", "vor", "ls"}
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; use any of fid ppl mrtl mcn vor ls")
    dist = _distributed(world_size)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    show = progress and rank == 0
    sampler = DDIMSampler(unet, scheduler, batch_size=eval_spec.batch_size, progress=show, device=device)
    shape = sampler.sample_shape
    seed = eval_spec.seed
    result = EvalResult(settings=_settings(eval_spec, shape))
    timings: dict[str, float] = {}
    partial: dict[str, Any] = {}  # this rank's share, gathered below

    # feature networks: rank 0 first, so a cache miss trains/computes once, then the others read the cache
    needs = tuple(m for m in ("fid", "ppl", "ls") if m in wanted)
    nets = None
    if needs:
        if rank == 0 or not dist:
            nets = bb.load_feature_networks(eval_spec, dataset_spec, needs=needs, device=device, progress=show)
        if dist:
            torch.distributed.barrier()
        if nets is None:
            nets = bb.load_feature_networks(eval_spec, dataset_spec, needs=needs, device=device, progress=False)
    names = nets.names if nets else bb.metric_backbone_names("standard", dataset_spec.kind)

    if "fid" in wanted:
        t0 = time.time()
        lo, hi = shard_range(eval_spec.fid.num_samples, rank, world_size)
        feats, grid = generated_features(sampler, nets.fid_features, num_samples=eval_spec.fid.num_samples,
                                         ddim_steps=eval_spec.fid.ddim_steps, seed=seed, shape=shape, start=lo, stop=hi,
                                         batch_size=eval_spec.batch_size, keep_images=16 if rank == 0 else 0)
        partial["fid"] = feats
        partial["grid"] = grid
        timings["fid"] = time.time() - t0
    if "ppl" in wanted:
        t0 = time.time()
        lo, hi = shard_range(eval_spec.ppl.num_samples, rank, world_size)
        partial["ppl"] = ppl_distances(sampler, nets.distance, num_samples=eval_spec.ppl.num_samples,
                                       ddim_steps=eval_spec.ppl.ddim_steps, eps=eval_spec.ppl.eps, seed=seed, shape=shape,
                                       start=lo, stop=hi, batch_size=max(1, eval_spec.batch_size // 2))
        timings["ppl"] = time.time() - t0
    if "mrtl" in wanted:
        t0 = time.time()
        spec = eval_spec.mrtl
        lo, hi = shard_range(spec.num_pairs, rank, world_size)
        partial["mrtl"] = rtl_per_pair(sampler, num_pairs=spec.num_pairs, num_points=spec.num_points, ddim_steps=spec.ddim_steps,
                                       seed=seed, shape=shape, start=lo, stop=hi,
                                       pairs_per_batch=max(1, eval_spec.batch_size // (spec.num_points + 1)))
        timings["mrtl"] = time.time() - t0
    if "mcn" in wanted or "vor" in wanted:
        t0 = time.time()
        from isosweep.data import build_dataset

        lo, hi = shard_range(eval_spec.jacobian.num_samples, rank, world_size)
        x = _jacobian_inputs(lo, hi, eval_spec, build_dataset(dataset_spec, train=False), scheduler, shape)
        partial["jac"] = _jacobian_svals(unet, x, eval_spec, device, show)
        timings["jacobian"] = time.time() - t0
    if "ls" in wanted:
        t0 = time.time()
        lo, hi = shard_range(eval_spec.ls.num_samples, rank, world_size)
        partial["ls"] = classify_samples(sampler, nets.classifier, num_samples=eval_spec.ls.num_samples,
                                         ddim_steps=eval_spec.ls.ddim_steps, seed=seed, shape=shape, start=lo, stop=hi,
                                         batch_size=eval_spec.batch_size)
        timings["ls_sampling"] = time.time() - t0

    gathered = _gather(partial, dist, world_size)
    if rank == 0 or not dist:
        _combine(result, gathered, wanted, eval_spec, dataset_spec, nets, names, shape, seed, show, timings)
        t0 = time.time()
        if "grid" not in gathered[0] or gathered[0]["grid"] is None:
            grid = sampler(initial_noise(16, shape, seed), eval_spec.fid.ddim_steps).images
        else:
            grid = gathered[0]["grid"]
        from isosweep.images import make_grid

        result.images["samples"] = _to_uint8_image(make_grid(grid.numpy()))
        distance = nets.distance if nets is not None and nets.distance is not None else _pixel_distance
        result.backbones["frame_distances"] = names["ppl"] if distance is not _pixel_distance else "pixel-rms"
        imgs, dists = _strips(sampler, shape, seed, eval_spec.fid.ddim_steps, distance)
        result.images.update(imgs)
        result.frame_distances = dists
        timings["images"] = time.time() - t0
        result.timings = {k: round(v, 3) for k, v in timings.items()}
    if dist:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _combine(result: EvalResult, gathered: list[dict], wanted: list[str], eval_spec, dataset_spec, nets, names,
             shape, seed: int, progress: bool, timings: dict) -> None:
    """Rank 0: turn every rank's share into the final numbers."""
    if "fid" in wanted:
        t0 = time.time()
        feats = np.concatenate([g["fid"] for g in gathered])
        mu, sigma = _reference_stats(eval_spec, dataset_spec, nets.fid_features, names["fid"], progress)
        result.metrics["fid"] = fid_from_features(feats, mu, sigma)
        result.backbones["fid"] = names["fid"]
        timings["fid"] += time.time() - t0
    if "ppl" in wanted:
        result.metrics["ppl"] = filtered_mean(np.concatenate([g["ppl"] for g in gathered]))
        result.backbones["ppl"] = names["ppl"]
    if "mrtl" in wanted:
        per_pair = torch.cat([g["mrtl"] for g in gathered])
        result.metrics["mrtl"], result.rtl_curve = summarize_rtl(per_pair)
        result.backbones["mrtl"] = names["mrtl"]
    if "mcn" in wanted or "vor" in wanted:
        svals = torch.cat([g["jac"] for g in gathered if g["jac"].numel()])
        if "mcn" in wanted:
            result.metrics["mcn"], result.backbones["mcn"] = mcn(svals), names["mcn"]
        if "vor" in wanted:
            result.metrics["vor"], result.backbones["vor"] = vor(svals), names["vor"]
    if "ls" in wanted:
        t0 = time.time()
        labels = np.concatenate([g["ls"][0] for g in gathered])
        conf = np.concatenate([g["ls"][1] for g in gathered])
        latents = initial_noise(eval_spec.ls.num_samples, shape, seed).flatten(1).numpy()
        scores = ls_scores(latents, labels, conf, keep=eval_spec.ls.keep, kernels=tuple(eval_spec.ls.kernels), seed=seed)
        for k, v in scores.items():
            result.metrics[k] = v
            result.backbones[k] = names["ls"]
        timings["ls_sampling"] += time.time() - t0


def _reference_stats(eval_spec, dataset_spec, features: Callable, backbone: str, progress: bool):
    from isosweep.data import build_dataset

    dataset = build_dataset(dataset_spec, train=False)
    n = min(len(dataset), eval_spec.fid.reference_samples or len(dataset))
    key = {"kind": dataset_spec.kind, "path": dataset_spec.path, "size": dataset_spec.size if dataset_spec.kind == "shapes" else None,
           "seed": dataset_spec.seed if dataset_spec.kind == "shapes" else None, "resolution": dataset_spec.resolution,
           "center_crop": dataset_spec.center_crop, "n": n, "version": 1}

    def batches():
        bs = eval_spec.batch_size
        for lo in range(0, n, bs):
            yield torch.stack([dataset[i][0] for i in range(lo, min(n, lo + bs))])

    return reference_statistics(batches(), features, backbone=backbone, dataset_key=key, cache_dir=bb.cache_dir(eval_spec),
                                progress=progress)


def _settings(eval_spec, shape) -> dict[str, Any]:
    return {"seed": eval_spec.seed, "backbone": eval_spec.backbone, "sample_shape": list(shape),
            "fid": eval_spec.fid.model_dump(), "ppl": eval_spec.ppl.model_dump(), "mrtl": eval_spec.mrtl.model_dump(),
            "jacobian": eval_spec.jacobian.model_dump(), "ls": eval_spec.ls.model_dump()}


def format_row(result: EvalResult, label: str = "model") -> str:
    """A Table-1 style block: one line per metric with its value and backbone, then the RTL(t) curve."""
    lines = [f"{'metric':<8} {'value':>12}  backbone", f"{'-' * 8} {'-' * 12}  {'-' * 20}"]
    for k in METRIC_ORDER:
        if k in result.metrics:
            lines.append(f"{k:<8} {result.metrics[k]:>12.4f}  {result.backbones.get(k, 'none')}")
    header = f"{label}: " + " | ".join(f"{k.upper()} {result.metrics[k]:.4g}" for k in METRIC_ORDER if k in result.metrics)
    out = [header, *lines]
    if result.rtl_curve:
        out.append("RTL(t): " + " ".join(f"{v:.3f}" for v in result.rtl_curve))
    return "\n".join(out)


def eval_command(args) -> int:
    """`isosweep eval MODEL [--spec S] [--set k=v] [--metrics ...]`: print a Table-1 row."""
    from pathlib import Path

    from isosweep.config import BaseModelSpec, load_spec
    from isosweep.models import MLFLOW_PREFIXES, find_diffusers_dir, load_unet_and_scheduler

    spec = load_spec(args.spec, args.overrides)
    src = args.model
    if src.startswith(MLFLOW_PREFIXES) or "://" in src:
        import mlflow  # only model URIs need MLflow

        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=src))
        found = find_diffusers_dir(root)
        if found is None:
            print(f"error: {src} downloaded to {root} but holds no diffusers directory", flush=True)
            return 2
        src = str(found)
    unet, scheduler = load_unet_and_scheduler(BaseModelSpec(source=src), spec.dataset, progress=True)
    device = "cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu"
    result = evaluate_model(unet.to(device), scheduler, spec.evaluation, spec.dataset, metrics=args.metrics, device=device)
    print(format_row(result, label=args.model))
    return 0


def result_to_dict(result: EvalResult) -> dict[str, Any]:
    """JSON-friendly dict (images left out)."""
    d = asdict(result)
    d.pop("images")
    return d
