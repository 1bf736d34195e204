"""`isosweep eval MODEL`: the evaluation suite of one model directory or MLflow model URI, as a Table-1 row."""

from __future__ import annotations

import argparse

import torch

from isosweep.config import BaseModelSpec, load_spec
from isosweep.evaluation.record import format_row
from isosweep.evaluation.suite import evaluate_model
from isosweep.models.loading import is_model_uri, load_unet_and_scheduler
from isosweep.tracking.models import resolve_model


def eval_command(args: argparse.Namespace) -> int:
    """`isosweep eval MODEL [--spec S] [--set k=v] [--metrics ...]`: print a Table-1 row."""
    spec = load_spec(args.spec, args.overrides)
    # a folder or hub id loads as it is; an MLflow URI is downloaded here, where MLflow may be imported
    source = str(resolve_model(args.model)) if is_model_uri(args.model) else args.model
    unet, scheduler = load_unet_and_scheduler(BaseModelSpec(source=source), spec.dataset, progress=True)
    device = "cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu"
    result = evaluate_model(unet.to(device), scheduler, spec.evaluation, spec.dataset, metrics=args.metrics, device=device)
    print(format_row(result, label=args.model))
    return 0
