"""One trial's fine-tuning loop: plain torch (+ DDP when torch.distributed is initialised), no Ray.

`train_loop(spec, reporter)` fine-tunes the base UNet with L = L_dsm + lambda_iso(p, t) L_iso
(`losses.IsoDiffusionLoss`), keeps an EMA of the weights, reports every `train.report_every` optimizer
steps and checkpoints every `train.checkpoint_every` steps and at the end. Ray lives in `trial.py`,
which hands the loop a `Reporter`; tests use `LocalReporter` in-process.

Checkpoint directory (see docs/training.md):
    model_index.json, unet/, scheduler/   the EMA UNet + scheduler: `DDPMPipeline.from_pretrained(dir)`
    train_state.pt                        raw weights, optimizer, EMA, GradScaler, step, epoch, data
                                          position, RNG states: what resume needs
    spec.json                             the resolved spec and the trial parameters
    eval/                                 (final checkpoint, when evaluated) metrics.json and PNGs

Determinism: every optimizer step draws its randomness from generators seeded by (seed, step, rank),
and the data order depends only on (seed, epoch), so a resumed run continues exactly where the
checkpointed one stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DDPMPipeline, UNet2DModel

from isosweep.config import SweepSpec, TrainSpec
from isosweep.data import ShardedLoader, build_dataset
from isosweep.losses import IsoDiffusionLoss, choose_iso, is_baseline, sample_timesteps
from isosweep.models import load_unet_and_scheduler

TRAIN_STATE = "train_state.pt"
TRIAL_KEYS = ("lambda_iso", "p", "metric")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before the step's backward, so no checkpoint is poisoned."""


class Reporter(Protocol):
    """What the loop needs from its runner (Ray Train, or `LocalReporter` in-process)."""

    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Called by every rank with the same cadence; `checkpoint_dir` only on rank 0."""

    def latest_checkpoint(self) -> str | None:
        """A local directory of the checkpoint to resume from, or None."""


class LocalReporter:
    """In-process reporter: records metrics and copies checkpoints to `root/checkpoint_<step>`."""

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        self.root, self.rank, self.world_size, self.device = Path(root), rank, world_size, torch.device(device)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.root / f"checkpoint_{int(metrics['step']):06d}"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dst)
            self.checkpoints.append(dst)

    def latest_checkpoint(self) -> str | None:
        return str(self.checkpoints[-1]) if self.checkpoints else None


@dataclass
class TrainResult:
    step: int
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)  # the last report
    eval: Any = None  # evaluate.EvalResult on every rank when evaluated


class EMA:
    """Exponential moving average of the weights, diffusers-style warm-up.

    decay_n = min(ema_decay, (1 + n) / (10 + n)) at update n, so a short fine-tune is not frozen at
    the base weights by decay 0.9999 (this is what diffusers' EMAModel does by default).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, model.parameters()):
            s.lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for s, p in zip(self.shadow, model.parameters()):
                p.copy_(s.to(p.dtype))
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = state["num_updates"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def resolve_spec(spec: SweepSpec | dict, trial_params: dict[str, Any] | None = None) -> SweepSpec:
    """The spec with the trial's lambda_iso / p / metric written into `train` (validated)."""
    from isosweep.config import spec_from_dict

    data = spec.to_dict() if isinstance(spec, SweepSpec) else copy.deepcopy(spec)
    for key, value in (trial_params or {}).items():
        if key not in TRIAL_KEYS:
            raise ValueError(f"unknown trial parameter {key!r}; trial parameters are {list(TRIAL_KEYS)}")
        data["train"][key] = value
    return spec_from_dict(data, source="trial config", check_paths=False)


def build_optimizer(params, tr: TrainSpec) -> torch.optim.Optimizer:
    """Adam (paper, MATH.md section 4) when weight_decay is 0, else AdamW (decoupled decay)."""
    cls = torch.optim.Adam if tr.weight_decay == 0 else torch.optim.AdamW
    return cls(params, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps, weight_decay=tr.weight_decay)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA only; on CPU mixed precision is forced off (slower, no benefit)."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def step_generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(shared, local): shared is identical on every rank (the per-batch iso coin), local is per rank."""
    # SeedSequence, not hash(): Python's string hashing differs between processes
    shared = np.random.SeedSequence([seed, step, 0]).generate_state(1, dtype=np.uint64)[0]
    local = np.random.SeedSequence([seed, step, 1, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(shared) >> 1), torch.Generator().manual_seed(int(local) >> 1)


def _all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
        values = values / world_size
    return values


def check_finite(out, step: int, world_size: int, device: torch.device) -> None:
    """Raise NonFiniteLossError on every rank if any rank's dsm or iso term is NaN/inf (one sync/step)."""
    flags = torch.stack([
        (~torch.isfinite(out.dsm)).float(),
        (~torch.isfinite(out.iso)).float() if out.iso is not None else torch.zeros((), device=out.dsm.device),
    ]).to(device)
    if world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.any():
        term = "dsm" if flags[0] > 0 else "iso"
        value = out.dsm.item() if term == "dsm" else (out.iso.item() if out.iso is not None else float("nan"))
        raise NonFiniteLossError(
            f"non-finite {term} loss at optimizer step {step + 1} (value on rank 0 of this error: {value}); "
            "the trial stops without writing a checkpoint: lower train.learning_rate or train.lambda_iso, "
            "or enable train.grad_clip"
        )


def save_checkpoint(directory: Path, unet: UNet2DModel, ema: EMA, scheduler, state: dict[str, Any], spec_json: dict[str, Any]) -> Path:
    """Write the EMA UNet + scheduler as a DDPMPipeline directory, train_state.pt and spec.json."""
    ema_unet = ema.copy_to(copy.deepcopy(unet)).to("cpu").eval()
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(directory)
    torch.save(state, directory / TRAIN_STATE)
    (directory / "spec.json").write_text(json.dumps(spec_json, indent=2, sort_keys=True))
    return directory


def load_train_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint (no {TRAIN_STATE}); resume needs a checkpoint written by isosweep train")
    return torch.load(path, map_location="cpu", weights_only=False)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_eval(directory: Path, result) -> None:
    """eval/metrics.json (metrics, backbones, rtl_curve, frame_distances, timings) and eval/<name>.png."""
    from PIL import Image

    out = Path(directory) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: getattr(result, k, None) for k in ("metrics", "backbones", "rtl_curve", "frame_distances", "timings")}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=float))
    for name, image in (getattr(result, "images", None) or {}).items():
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out / f"{name}.png")


def _load_base(spec: SweepSpec, rank: int, world_size: int):
    """Rank 0 loads (and, for builtin:shapes, pretrains into the cache) first; the others then reuse it."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    unet, scheduler = load_unet_and_scheduler(spec.base_model, spec.dataset, progress=rank == 0)
    if world_size > 1 and rank == 0:
        dist.barrier()
    return unet, scheduler


def train_loop(spec: SweepSpec | dict, reporter: Reporter, *, trial_params: dict[str, Any] | None = None,
               evaluate: bool = False, resume_from: str | None = None,
               on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune one trial on this worker's shard; every DDP rank calls it with the same arguments.

    resume_from: a checkpoint directory used when the reporter has none (a restarted Ray run's own
    checkpoint wins). on_step(step): called after each optimizer step (tests inject faults here).
    """
    spec = resolve_spec(spec, trial_params)
    tr, rank, world, device = spec.train, reporter.rank, reporter.world_size, reporter.device
    distributed = world > 1
    torch.manual_seed(tr.seed)
    unet, scheduler = _load_base(spec, rank, world)
    if scheduler.config.num_train_timesteps != tr.timesteps:
        raise ValueError(f"train.timesteps={tr.timesteps} but the base model's scheduler has T={scheduler.config.num_train_timesteps}; set train.timesteps to match")
    unet.to(device).train()
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) if distributed else unet
    ema = EMA(unet, tr.ema_decay)  # after DDP's broadcast of rank 0's weights, so EMAs agree
    opt = build_optimizer(unet.parameters(), tr)
    amp = autocast_dtype(tr.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    loss_fn = IsoDiffusionLoss(lambda_iso=tr.lambda_iso, p=tr.p, metric=tr.metric, reduction=tr.iso_reduction, timesteps=tr.timesteps,
                               prediction_type=scheduler.config.get("prediction_type", "epsilon"))
    alphas = scheduler.alphas_cumprod.to(device)

    batch = tr.per_worker_batch_size(world)
    loader = ShardedLoader(build_dataset(spec.dataset, train=True), batch, rank, world, seed=tr.seed)
    steps_per_epoch = loader.batches_per_epoch // tr.grad_accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"one epoch has {loader.batches_per_epoch} micro-batches per worker, fewer than train.grad_accumulation={tr.grad_accumulation}")
    max_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))

    step, epoch, step_in_epoch = 0, 0, 0
    resumed_at: list[int] = []  # provenance: the steps this run was resumed from
    ckpt = reporter.latest_checkpoint() or resume_from
    if ckpt:
        state = load_train_state(ckpt)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        resumed_at = state.get("resumed_at", []) + [step]
        _set_rng_state(state["rng"])
    spec_json = {"spec": spec.to_dict(), "trial_params": trial_params or {}, "world_size": world}

    window = _Window()
    last_metrics: dict[str, Any] = {}
    eval_result = None
    while step < max_steps:
        micro_batches = loader.epoch_batches(epoch, start_batch=step_in_epoch * tr.grad_accumulation)
        for _ in range(steps_per_epoch - step_in_epoch):
            t0 = time.perf_counter()
            shared, local = step_generators(tr.seed, step, rank)
            iso_on = not loss_fn.baseline and choose_iso(tr.p, shared)
            for k in range(tr.grad_accumulation):
                x0, _ = next(micro_batches)
                x0 = x0.to(device, non_blocking=True)
                t, iso_on = sample_timesteps(x0.shape[0], tr.p, tr.timesteps, local, lambda_iso=tr.lambda_iso, iso_on=iso_on, device=device)
                noise = torch.randn(x0.shape, generator=local).to(device)
                # DDP all-reduces gradients only on the last micro-batch of the step
                sync = model.no_sync() if distributed and k < tr.grad_accumulation - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out = loss_fn(model, unet, x0, t, noise, iso_on, alphas, generator=local)
                    check_finite(out, step, world, device)
                    scaler.scale(out.loss / tr.grad_accumulation).backward()
                window.add(out, tr.grad_accumulation)
            scaler.unscale_(opt)
            if tr.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), tr.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            ema.update(unet)
            step, step_in_epoch = step + 1, step_in_epoch + 1
            window.end_step(time.perf_counter() - t0, iso_on)
            if on_step is not None:
                on_step(step)

            final = step >= max_steps
            due_ckpt = final or step % tr.checkpoint_every == 0
            if not (due_ckpt or step % tr.report_every == 0):
                continue
            last_metrics = window.flush(world, device, tr.global_batch_size) | {
                "step": step, "epoch": epoch + step_in_epoch / steps_per_epoch, "lr": opt.param_groups[0]["lr"]}
            state = None
            if due_ckpt:
                state = {"unet": {k: v.cpu() for k, v in unet.state_dict().items()}, "optimizer": opt.state_dict(),
                         "ema": ema.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "epoch": epoch + (step_in_epoch == steps_per_epoch),
                         "step_in_epoch": step_in_epoch % steps_per_epoch, "rng": _rng_state(),
                         "resumed_at": resumed_at}
            if final and evaluate:
                eval_result = run_evaluation(spec, ema, unet, scheduler, device, rank, world)
                last_metrics |= {k: v for k, v in eval_result.metrics.items()}
            _report(reporter, last_metrics, state, unet, ema, scheduler, spec_json, eval_result, rank)
            if final:
                break
        else:
            epoch, step_in_epoch = epoch + 1, 0
            continue
        break
    return TrainResult(step=step, epoch=epoch, metrics=last_metrics, eval=eval_result)


def _report(reporter, metrics, state, unet, ema, scheduler, spec_json, eval_result, rank) -> None:
    """Report on every rank; rank 0 also writes the checkpoint (and the evaluation) to a temp dir."""
    if state is None or rank != 0:
        reporter.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="isosweep-ckpt-") as tmp:
        save_checkpoint(Path(tmp), unet, ema, scheduler, state, spec_json)
        if eval_result is not None:
            save_eval(Path(tmp), eval_result)
        reporter.report(metrics, checkpoint_dir=tmp)


def run_evaluation(spec: SweepSpec, ema: EMA, unet: UNet2DModel, scheduler, device, rank: int, world: int):
    """The evaluation suite on the EMA weights, sharded over the trial's workers (all ranks call it)."""
    from isosweep.evaluate import evaluate_model

    ema_unet = ema.copy_to(copy.deepcopy(unet)).eval()
    return evaluate_model(ema_unet, scheduler, spec.evaluation, spec.dataset, device=device, rank=rank, world_size=world, progress=rank == 0)


class _Window:
    """Statistics since the last report; read (one device sync, one all-reduce) only when reported."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.steps, self.iso_steps, self.seconds = 0, 0, 0.0

    def add(self, out, accumulation: int) -> None:
        """Add one micro-batch: loss, dsm, iso, tr_r, each divided by the accumulation count."""
        zero = torch.zeros((), device=out.dsm.device)
        iso_on = out.iso is not None
        stats = [out.loss.detach(), out.dsm, out.iso if iso_on else zero, out.tr_r if iso_on else zero]
        self.pending.append(torch.stack([v.float() for v in stats]) / accumulation)

    def end_step(self, seconds: float, iso_on: bool) -> None:
        self.steps += 1
        self.iso_steps += int(iso_on)
        self.seconds += seconds

    def flush(self, world: int, device: torch.device, global_batch: int) -> dict[str, Any]:
        totals = torch.stack(self.pending).sum(0).to(device)
        totals = _all_reduce_mean(totals.float(), world).double().cpu()
        n = self.steps
        out = {"loss": totals[0].item() / n, "dsm_loss": totals[1].item() / n, "iso_fraction": self.iso_steps / n,
               "s_per_step": self.seconds / n, "images_per_s": global_batch * n / max(self.seconds, 1e-9)}
        if self.iso_steps:
            # iso and tr_r are averaged over the steps where the isometry loss was on
            iso_mean = totals[2].item() / self.iso_steps
            out |= {"iso_loss": iso_mean, "tr_ratio": iso_mean, "tr_r": totals[3].item() / self.iso_steps}
        self.reset()
        return out
