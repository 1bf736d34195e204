"""`isosweep train SPEC`: one trial with the spec's fixed `train` values on Ray Train, no Tune."""

from __future__ import annotations

import argparse
import time

from isosweep.console import note, say
from isosweep.constants import EXIT_COMPLETED, EXIT_ERROR
from isosweep.spec import load_spec
from isosweep.sweep.ray_env import init_ray
from isosweep.sweep.trainer import build_trainer


def train_command(args: argparse.Namespace) -> int:
    """`isosweep train SPEC [--set k=v] [--address A] [--storage S] [--resume-from DIR]`."""
    spec = load_spec(args.spec, args.overrides)
    storage = args.storage or spec.storage.path
    run_name = f"{spec.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(args.address, dashboard=False)
    tr = spec.train
    say(f"train {spec.name}: lambda_iso={tr.lambda_iso:g} p={tr.p:g} iso_metric={tr.iso_metric} iso_timesteps={tr.iso_timesteps} "
          f"workers={spec.resources.workers_per_trial} global_batch={tr.global_batch_size} "
          f"base={spec.base_model.source} run={run_name} storage={storage}")
    t0 = time.time()
    trainer = build_trainer(spec, run_name=run_name, storage_path=storage, resume_from=args.resume_from)
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        note("error: the run finished without a checkpoint")
        return EXIT_ERROR
    m = result.metrics or {}
    say(f"done in {time.time() - t0:.0f} s: step {m.get('step')} loss={m.get('loss', float('nan')):.4g}")
    say(f"final checkpoint (DDPMPipeline directory): {result.checkpoint.path}")
    return EXIT_COMPLETED
