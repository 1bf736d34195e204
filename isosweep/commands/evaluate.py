"""`isosweep eval MODEL`: the evaluation suite of one model directory or MLflow model URI, as a Table-1 row."""

from __future__ import annotations

import argparse

import torch

from isosweep.console import result
from isosweep.constants import EXIT_COMPLETED
from isosweep.evaluation.record import format_row
from isosweep.evaluation.suite import evaluate_model
from isosweep.models.loading import load_base
from isosweep.spec import BaseModelSpec, load_spec
from isosweep.tracking.models import download_model


def eval_command(args: argparse.Namespace) -> int:
    """`isosweep eval MODEL [--spec S] [--set k=v] [--metrics ...]`: print a Table-1 row."""
    spec = load_spec(args.spec, args.overrides)
    # a folder or hub id loads as it is; an MLflow URI is downloaded by MLflow into a temporary folder,
    # removed once loaded (models.loading)
    base = load_base(BaseModelSpec(source=args.model), spec.dataset, progress=True, fetch=download_model)
    device = "cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu"
    codec = base.codec.to(device) if base.codec is not None else None  # a latent model: its samples decoded
    record = evaluate_model(base.unet.to(device), base.scheduler, spec.evaluation, spec.dataset, metrics=args.metrics,
                            device=device, codec=codec)
    result(format_row(record, label=args.model))
    return EXIT_COMPLETED
