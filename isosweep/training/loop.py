"""One trial's fine-tuning loop: plain torch (+ DDP when torch.distributed is initialised), no Ray.

`train_loop(spec, reporter)` fine-tunes the base UNet with L = L_dsm + lambda_iso(p, t) L_iso
(`core.losses.IsoDiffusionLoss`), keeps an EMA of the weights, reports every `train.report_every`
optimizer steps and checkpoints (`checkpoint.py`) every `train.checkpoint_every` steps and at the end.
Ray lives in `sweep/train_worker.py`, which hands the loop a `Reporter`; tests use `LocalReporter`.
Evaluation is not imported here: the caller passes an `evaluator`, run once at the end on the trial's model,
and optionally a `scorer` (a cheap FID every `evaluation.checkpoint_fid.every` steps): the trial's model is
then the EMA weights of the step with the lowest score (`selection.py`), else the final EMA weights.

Provenance: each checkpoint's spec.json (`base_model`) and train_state.pt record the weights the trial started
from: the base model's source, the registry version it resolved to (from the caller), and `weights_sha256` of the
loaded UNet, hashed once on rank 0; a resumed run keeps what its checkpoint recorded, since its weights descend
from that base, whatever the source resolves to now.

Determinism: every optimizer step draws its randomness from generators seeded by (seed, step, rank),
and the data order depends only on (seed, epoch), so a resumed run continues exactly where the
checkpointed one stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from diffusers import UNet2DModel

from isosweep.console import say
from isosweep.core.codec import Codec
from isosweep.core.ema import EMA
from isosweep.core.losses import IsoDiffusionLoss
from isosweep.core.step import FiniteFlags
from isosweep.core.step import step_generators as core_step_generators
from isosweep.data.datasets import ShardedLoader, build_dataset
from isosweep.files import scratch_dir
from isosweep.models.loading import BaseModel, Fetch, load_base, weights_sha256
from isosweep.redact import scrub_text, scrub_tree
from isosweep.spec import POINT_KEYS, TRIAL_KEYS, SweepSpec, TrainSpec
from isosweep.training.best_step import Scorer, Selection
from isosweep.training.checkpoint import StoredCheckpoint, resume_state, rng_state, save_checkpoint, set_rng_state
from isosweep.training.reporting import Reporter, StepStats


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before the optimizer step, so no weights or checkpoint are poisoned."""

    deterministic = True  # the same inputs and seed diverge again: not retried (isosweep.errors)


class Evaluation(Protocol):
    """What an evaluator returns: the metrics to report and a way to write its record into a checkpoint."""

    metrics: dict[str, float]

    def write(self, directory: Path) -> None: ...


# evaluator(unet, scheduler, device, rank, world_size, codec=...): every rank calls it once, on the trial's model;
# codec: a latent model's frozen autoencoder (its samples are decoded to images), None for a pixel-space model
Evaluator = Callable[[UNet2DModel, Any, torch.device, int, int], Evaluation]


@dataclass
class TrainResult:
    step: int
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)  # the last report
    eval: Evaluation | None = None  # on every rank, when an evaluator was given


@dataclass
class Position:
    """Where the loop is: optimizer steps done, the epoch, and steps done in that epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    resumed_at: list[int] = field(default_factory=list)  # provenance: the steps this run was resumed from
    base_model: dict[str, str] = field(default_factory=dict)  # provenance: the weights the run started from (rank 0)

    def state(self, steps_per_epoch: int) -> dict[str, Any]:
        """As saved in a checkpoint: a finished epoch is saved as the start of the next one."""
        done = self.step_in_epoch == steps_per_epoch
        return {"step": self.step, "epoch": self.epoch + done, "step_in_epoch": self.step_in_epoch % steps_per_epoch,
                "resumed_at": list(self.resumed_at), "base_model": dict(self.base_model)}


@dataclass
class Run:
    """Everything one worker's loop holds: the model (and its DDP wrapper), optimiser, EMA and data."""

    spec: SweepSpec
    unet: UNet2DModel
    model: torch.nn.Module  # the DDP wrapper, or the UNet itself on one worker
    scheduler: Any
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    loss_fn: IsoDiffusionLoss
    alphas_cumprod: torch.Tensor  # on the device
    loader: ShardedLoader
    steps_per_epoch: int
    max_steps: int
    rank: int
    world: int
    device: torch.device
    codec: Codec | None = None  # a latent model's frozen autoencoder: batches are encoded before the losses


def build_optimizer(params, tr: TrainSpec) -> torch.optim.Optimizer:
    """Adam (paper, docs/math.md section 4) when weight_decay is 0, else AdamW (decoupled decay)."""
    cls = torch.optim.Adam if tr.weight_decay == 0 else torch.optim.AdamW
    return cls(params, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps, weight_decay=tr.weight_decay)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA only; on CPU mixed precision is forced off (slower, no benefit)."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def step_generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(shared, local) CPU generators of step `step` (`core.step.step_seeds`): shared is identical on every rank (the
    per-step iso coin, then each micro-batch's per_timestep t_iso), local is per rank. The loop draws on the CPU and
    moves the draws to the device, so a GPU run draws the numbers a CPU run draws (`core.step.step_generators` with a
    device is the host-sync-free alternative, bit-identical on the CPU)."""
    gens = core_step_generators(seed, step, rank)
    return gens.shared, gens.local


def check_finite(finite: FiniteFlags, step: int, world_size: int) -> None:
    """Raise NonFiniteLossError on every rank if any rank saw a NaN/inf dsm or iso term since `finite.since`.

    One device sync and one all-reduce per read, whatever the accumulation count. The loop reads every step, before
    the optimizer applies the step; a read deferred over several steps (`FiniteFlags`) names the window instead.
    """
    if world_size > 1:
        dist.all_reduce(finite.flags, op=dist.ReduceOp.MAX)
    bad = finite.first()
    if bad is not None:
        term, value = bad
        where = (f"at optimizer step {step + 1}" if finite.since >= step else
                 f"in optimizer steps {finite.since + 1}-{step + 1} (the weights after the first of them are not to be trusted)")
        raise NonFiniteLossError(
            f"non-finite {term} loss {where} (value on rank 0 of this error: {value}); "
            "the trial stops without writing a checkpoint: lower train.learning_rate or train.lambda_iso, "
            "or enable train.grad_clip"
        )


def _check_applied(spec: SweepSpec, trial_params: dict[str, Any] | None) -> None:
    """Refuse trial parameters that the spec does not carry (the caller resolves them into the spec once)."""
    differ = {k: v for k, v in (trial_params or {}).items()
              if k in TRIAL_KEYS + POINT_KEYS and v is not None and getattr(spec.train, k) != v}
    if differ:
        raise ValueError(f"train_loop: trial parameters {differ} are not in the spec's train section; "
                         "pass spec.resolve_trial_spec(spec, trial_params) as the spec")


def train_loop(spec: SweepSpec, reporter: Reporter, *, trial_params: dict[str, Any] | None = None,
               evaluator: Evaluator | None = None, resume_from: str | StoredCheckpoint | None = None, fetch_base: Fetch | None = None,
               provenance: dict[str, Any] | None = None, scorer: Scorer | None = None,
               on_base: Callable[[dict[str, str]], None] | None = None) -> TrainResult:
    """Fine-tune one trial on this worker's shard; every DDP rank calls it with the same arguments.

    spec: the trial's spec, its parameters already written into `train` (`spec.resolve_trial_spec`, once, by the
    caller); trial_params: those parameters as the search gave them, recorded in every checkpoint's spec.json (a
    value that differs from the spec's is refused: a trial must never train with other values than it records).

    resume_from: a checkpoint (local folder, storage URI, or a `pyarrow.fs` checkpoint such as Ray's) used
    when the reporter has none (a restarted Ray run's own checkpoint wins); a corrupt one is passed over
    for the newest older one of its run that verifies (`checkpoint.resume_state`).
    fetch_base(uri, dst): downloads an MLflow base model (a `models.loading.Fetch`).
    provenance: where the run ran (e.g. each rank's node), saved in every checkpoint's spec.json; its `base_model`
    ({resolved, version}: what the caller's `fetch_base` pinned the source to) joins the loop's own record of it.
    on_base(base_model): called once on rank 0 with that record ({source, unet_sha256, resolved?, version?}).
    scorer: the cheap FID of `evaluation.checkpoint_fid` (ignored when its `every` is 0 or null); the step with the
    lowest score is the trial's model: evaluated, and saved as the final checkpoint's pipeline.
    """
    _check_applied(spec, trial_params)
    tr = spec.train
    run = _build_run(spec, reporter, fetch_base)
    selection = Selection.of(spec) if scorer is not None else None
    pos = _resume(run, reporter.latest_checkpoint() or resume_from, selection)
    if run.rank == 0:
        pos.base_model = pos.base_model or _started_from(run, (provenance or {}).get("base_model") or {})
        if on_base is not None:
            on_base(dict(pos.base_model))
    spec_json = {"spec": scrub_tree(spec.to_dict()), "trial_params": trial_params or {}, "world_size": run.world,
                 **(provenance or {}), "base_model": dict(pos.base_model)}
    stats, metrics, evaluation = StepStats(), {}, None
    while pos.step < run.max_steps:
        micro_batches = run.loader.epoch_batches(pos.epoch, start_batch=pos.step_in_epoch * tr.grad_accumulation)
        while pos.step_in_epoch < run.steps_per_epoch and pos.step < run.max_steps:
            _optimizer_step(run, micro_batches, pos.step, stats)
            pos.step, pos.step_in_epoch = pos.step + 1, pos.step_in_epoch + 1
            final = pos.step >= run.max_steps
            due_checkpoint = final or pos.step % tr.checkpoint_every == 0
            due_score = selection is not None and selection.due(pos.step, final)
            if not (due_checkpoint or due_score or pos.step % tr.report_every == 0):
                continue
            metrics = stats.flush(run.world, run.device, tr.global_batch_size) | {
                "step": pos.step, "epoch": pos.epoch + pos.step_in_epoch / run.steps_per_epoch,
                "lr": run.optimizer.param_groups[0]["lr"]}
            state = _train_state(run, pos) if due_checkpoint else None
            model = None  # the final checkpoint's pipeline when not the last EMA weights
            ema_model = _ema_model(run) if due_score or final else None  # one copy serves score, selection and evaluation
            if due_score:
                metrics |= selection.score(scorer, ema_model, run.scheduler, run.device, run.rank, run.world, pos.step,
                                           codec=run.codec)
            if final and selection is not None:
                model = selection.selected(ema_model)
                metrics |= selection.summary()
            if final and evaluator is not None:
                evaluated = model if model is not None else ema_model
                evaluation = evaluator(evaluated, run.scheduler, run.device, run.rank, run.world, codec=run.codec)
                metrics |= dict(evaluation.metrics)
            _report(reporter, run, metrics, state, spec_json, evaluation, selection, model)
        if pos.step_in_epoch == run.steps_per_epoch and pos.step < run.max_steps:
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
    return TrainResult(step=pos.step, epoch=pos.epoch, metrics=metrics, eval=evaluation)


def _build_run(spec: SweepSpec, reporter: Reporter, fetch_base: Fetch | None) -> Run:
    """Load the base model (rank 0 first), wrap it for DDP, and build the optimiser, EMA, loss and data shard."""
    tr, rank, world, device = spec.train, reporter.rank, reporter.world_size, reporter.device
    torch.manual_seed(tr.seed)
    base = _load_base(spec, rank, world, fetch_base)
    unet, scheduler = base.unet, base.scheduler
    if scheduler.config.num_train_timesteps != tr.timesteps:
        raise ValueError(f"train.timesteps={tr.timesteps} but the base model's scheduler has T={scheduler.config.num_train_timesteps}; set train.timesteps to match")
    unet.to(device).train()
    model = unet
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    ema = EMA(unet, tr.ema_decay)  # after DDP's broadcast of rank 0's weights, so EMAs agree
    amp = autocast_dtype(tr.mixed_precision, device)
    loss_fn = IsoDiffusionLoss(lambda_iso=tr.lambda_iso, p=tr.p, iso_metric=tr.iso_metric, reduction=tr.iso_reduction,
                               timesteps=tr.timesteps, prediction_type=scheduler.config.get("prediction_type", "epsilon"),
                               iso_timesteps=tr.iso_timesteps, iso_batch=tr.iso_batch, share_forward=tr.iso_shared_forward,
                               iso_every=tr.iso_every)
    loader = ShardedLoader(build_dataset(spec.dataset, train=True), tr.per_worker_batch_size(world), rank, world, seed=tr.seed)
    steps_per_epoch = loader.batches_per_epoch // tr.grad_accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"one epoch has {loader.batches_per_epoch} micro-batches per worker, fewer than train.grad_accumulation={tr.grad_accumulation}")
    return Run(spec=spec, unet=unet, model=model, scheduler=scheduler, ema=ema, optimizer=build_optimizer(unet.parameters(), tr),
               scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16), amp=amp, loss_fn=loss_fn,
               alphas_cumprod=scheduler.alphas_cumprod.to(device), loader=loader,
               steps_per_epoch=steps_per_epoch, max_steps=tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch)),
               rank=rank, world=world, device=device, codec=base.codec.to(device) if base.codec is not None else None)


def _load_base(spec: SweepSpec, rank: int, world_size: int, fetch_base: Fetch | None) -> BaseModel:
    """Rank 0 loads (and, for builtin:shapes, pretrains into the cache) first; the others then reuse it."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    base = load_base(spec.base_model, spec.dataset, progress=rank == 0, fetch=fetch_base)
    if world_size > 1 and rank == 0:
        dist.barrier()
    return base


def _resume(run: Run, checkpoint: str | StoredCheckpoint | None, selection: Selection | None) -> Position:
    """Restore weights, optimiser, EMA, scaler, RNGs and the cheap-FID selection from `checkpoint` (or, when it is
    corrupt, the newest older checkpoint of its run that verifies); the position to continue from."""
    if not checkpoint:
        return Position()
    point = resume_state(checkpoint, rank=run.rank, world_size=run.world, device=run.device)
    if run.rank == 0:
        for line in point.skipped:
            say(f"{line}; passed over")
        say(f"resuming from {point.source} (step {point.state['step']})")
    state = point.state
    run.unet.load_state_dict(state["unet"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.ema.load_state_dict(state["ema"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if selection is not None:
        selection.restore(state.get("selection"), verbose=run.rank == 0)
    # the weights descend from the base the checkpoint recorded; an older checkpoint without that record says so
    started = state.get("base_model") or {"source": scrub_text(run.spec.base_model.source), "unet_sha256": "unknown (not recorded)"}
    return Position(state["step"], state["epoch"], state["step_in_epoch"], list(state.get("resumed_at", [])) + [state["step"]],
                    dict(started))


def _started_from(run: Run, pinned: dict[str, str]) -> dict[str, str]:
    """What a run that did not resume starts from: the source as given, what the caller pinned it to, and the
    sha256 of the UNet's weights as loaded (before any step: DDP gives every rank these rank-0 weights), and of a latent
    model's autoencoder."""
    started = {"source": scrub_text(run.spec.base_model.source), **{k: scrub_text(str(v)) for k, v in pinned.items()},
               "unet_sha256": weights_sha256(run.unet)}
    if run.codec is not None and run.codec.module is not None:  # a latent model: its frozen autoencoder too
        started[f"{run.codec.name}_sha256"] = weights_sha256(run.codec.module)
    return started


def _optimizer_step(run: Run, micro_batches, step: int, stats: StepStats) -> None:
    """One optimizer step over `grad_accumulation` micro-batches: the iso coin, losses, one finite check, update.

    The coin picks the step's timestep range; the isometry term is taken on an iso-range step when the step is
    due for it (`IsoDiffusionLoss.due`: every step unless train.iso_every > 1)."""
    tr = run.spec.train
    t0 = time.perf_counter()
    shared, local = step_generators(tr.seed, step, run.rank)
    iso_on = run.loss_fn.coin(shared)
    due = run.loss_fn.due(step)
    finite = FiniteFlags(run.device, since=step)  # any non-finite dsm / iso term on this rank during this step
    for k in range(tr.grad_accumulation):
        x0, _ = next(micro_batches)
        x0 = x0.to(run.device, non_blocking=True)
        if run.codec is not None:  # a latent model: the losses act on the frozen autoencoder's latents (no grad)
            x0 = run.codec.encode(x0)
        d = run.loss_fn.draw(x0, iso_on, local, shared, term=due)  # per_timestep: the iso t from `shared`, one for all ranks
        iso_on = d.iso_on
        take = iso_on and due
        # DDP all-reduces gradients only on the last micro-batch of the step
        last = k == tr.grad_accumulation - 1
        sync = run.model.no_sync() if run.world > 1 and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
                out = run.loss_fn(run.model, run.unet, x0, d.t, d.noise, take, run.alphas_cumprod, generator=local,
                                  t_iso=d.t_iso, drawn=True)
            finite.observe(out.dsm, out.iso)
            run.scaler.scale(out.loss / tr.grad_accumulation).backward()
        stats.add(out, tr.grad_accumulation)
    check_finite(finite, step, run.world)
    run.scaler.unscale_(run.optimizer)
    if tr.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.unet.parameters(), tr.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet)
    stats.end_step(time.perf_counter() - t0, iso_on and due)


def _train_state(run: Run, pos: Position) -> dict[str, Any]:
    """What resume needs: raw weights, optimiser, EMA, scaler, position and RNG states (tensors and plain values)."""
    return {"unet": {k: v.cpu() for k, v in run.unet.state_dict().items()}, "optimizer": run.optimizer.state_dict(),
            "ema": run.ema.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
            **pos.state(run.steps_per_epoch)}


def _ema_model(run: Run) -> UNet2DModel:
    """A copy of the UNet holding the EMA weights, in eval mode (what is evaluated and saved)."""
    return run.ema.copy_to(copy.deepcopy(run.unet)).eval()


def _report(reporter: Reporter, run: Run, metrics: dict[str, Any], state: dict[str, Any] | None,
            spec_json: dict[str, Any], evaluation: Evaluation | None, selection: Selection | None = None,
            model: UNet2DModel | None = None) -> None:
    """Report on every rank; rank 0 also writes the checkpoint (with `model` as its pipeline when given, and the
    selection and evaluation record before the manifest) to a temporary folder, which the reporter persists (Ray
    Train uploads it) and which is removed after."""
    if state is None or run.rank != 0:
        reporter.report(metrics)
        return

    def extra(folder: Path) -> None:
        if selection is not None:
            selection.write(folder, run.unet)
        if evaluation is not None:
            evaluation.write(folder)

    with scratch_dir("ckpt") as tmp:  # a worker killed here leaves it to the next worker's clean-up (files.scratch_dir)
        folder = save_checkpoint(Path(tmp) / "checkpoint", run.unet, run.ema, run.scheduler, state, spec_json,
                                 extra=extra, model=model, codec=run.codec, max_steps=run.max_steps)
        reporter.report(metrics, checkpoint_dir=str(folder))
