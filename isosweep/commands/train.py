"""`isosweep train SPEC`: one trial with the spec's fixed `train` values on Ray Train, no Tune."""

from __future__ import annotations

import argparse
import time
from typing import Any

from isosweep.console import note, say
from isosweep.constants import EXIT_COMPLETED, EXIT_ERROR
from isosweep.redact import scrub_text
from isosweep.spec import SweepSpec, load_spec
from isosweep.sweep.ray_env import init_ray
from isosweep.sweep.trainer import build_trainer


def train_command(args: argparse.Namespace) -> int:
    """`isosweep train SPEC [--set k=v] [--address A] [--storage S] [--resume-from DIR]`."""
    spec = load_spec(args.spec, args.overrides)
    storage = args.storage or spec.storage.path
    run_name = f"{spec.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(args.address, dashboard=False)
    say(start_line(spec, run_name, storage))
    t0 = time.time()
    trainer = build_trainer(spec, run_name=run_name, storage_path=storage, resume_from=args.resume_from)
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        note("error: the run finished without a checkpoint")
        return EXIT_ERROR
    for line in finish_lines(result.metrics or {}, time.time() - t0, result.checkpoint.path):
        say(line)
    return EXIT_COMPLETED


def start_line(spec: SweepSpec, run_name: str, storage: str) -> str:
    """What `train` says as it starts, scrubbed: the base model and the storage may be URIs with credentials."""
    tr = spec.train
    return scrub_text(f"train {spec.name}: lambda_iso={tr.lambda_iso:g} p={tr.p:g} iso_metric={tr.iso_metric} "
                      f"iso_timesteps={tr.iso_timesteps} workers={spec.resources.workers_per_trial} "
                      f"global_batch={tr.global_batch_size} base={spec.base_model.source} run={run_name} storage={storage}")


def finish_lines(metrics: dict[str, Any], seconds: float, checkpoint_path: str) -> list[str]:
    """What `train` says when it is done: its last step and loss, and where the final checkpoint is (scrubbed)."""
    return [f"done in {seconds:.0f} s: step {metrics.get('step')} loss={metrics.get('loss', float('nan')):.4g}",
            scrub_text(f"final checkpoint (DDPMPipeline directory): {checkpoint_path}")]
