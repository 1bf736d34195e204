"""A trial's final metrics and artifacts (checkpoint, evaluation record) and the sweep's results, logged to MLflow."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from isosweep.core.names import CHEAP_FID
from isosweep.evaluation.record import EVAL_DIR, EvalResult, read_record
from isosweep.redact import scrub_text
from isosweep.results.plots import rtl_plot
from isosweep.tracking.client import MAX_METRICS_PER_BATCH, chunks, client, params_of, retry_call, tags_of
from isosweep.tracking.runs import TAG_CHAMPION
from isosweep.training.best_step import BEST_DIR, selection_columns

CHECKPOINT_ARTIFACT_PATH = "checkpoint"
EVAL_ARTIFACT_PATH = EVAL_DIR
# Files of a checkpoint directory that are training state, not the model (best/: the selected weights for resume;
# in the final checkpoint they are the pipeline's own unet/).
CHECKPOINT_EXCLUDE = ("train_state.pt", "eval", BEST_DIR, "__pycache__", "*.lock")
TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".csv")  # scrubbed of credentials before upload


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a diffusers checkpoint without training state (hard links where possible)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*CHECKPOINT_EXCLUDE), copy_function=link_or_copy)
    return dst


def log_trial_result(tracking_uri: str, run_id: str, checkpoint_dir: str | os.PathLike, *,
                     only_metrics: set[str] | None = None, log_eval: bool = True, log_checkpoint: bool = True) -> None:
    """Log a trial's final checkpoint and its evaluation record to the trial's child run.

    checkpoint_dir: the final diffusers checkpoint (DDPMPipeline dir) -> artifacts `checkpoint/`, without
    `train_state.pt` and its own `eval/`. Its evaluation record (`evaluation.record`) -> final metrics at
    step 0, param and tag `backbone.<metric>`, step metric `rtl_t` (RTL(t) per DDIM step) and artifacts
    `eval/` (metrics.json, grid and strip PNGs, rtl_curve.png); with a cheap-FID selection, param and tag
    `backbone.fid_cheap` (the curve and the selected step are step metrics of the trainer's StepLogger). only_metrics: log just these metrics;
    log_eval / log_checkpoint=False skip those artifacts (`sync` uses them for what is already there).
    """
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint_dir {ckpt} is not a directory")
    record = read_record(ckpt)
    c = client(tracking_uri)
    run = retry_call("get run", tracking_uri, c.get_run, run_id)
    backbone = selection_columns(ckpt).get(f"backbone_{CHEAP_FID}")
    if backbone and f"backbone.{CHEAP_FID}" not in run.data.params:
        names = {f"backbone.{CHEAP_FID}": backbone}
        retry_call("log backbones", tracking_uri, c.log_batch, run_id, params=params_of(names), tags=tags_of(names))
    if record is not None:
        _log_record(tracking_uri, run, record, only_metrics, log_eval)
        if log_eval:
            with tempfile.TemporaryDirectory() as tmp:
                ev = Path(tmp) / EVAL_ARTIFACT_PATH
                shutil.copytree(ckpt / EVAL_DIR, ev)
                if record.rtl_curve and not (ev / "rtl_curve.png").exists():
                    rtl_plot({"RTL(t)": record.rtl_curve}, ev / "rtl_curve.png")
                for f in ev.rglob("*"):  # every text file the record folder may hold, not only metrics.json
                    if f.is_file() and f.suffix in TEXT_SUFFIXES:
                        f.write_text(scrub_text(f.read_text(errors="replace")))
                retry_call("log eval artifacts", tracking_uri, c.log_artifacts, run_id, str(ev), EVAL_ARTIFACT_PATH)
    if log_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            staged = _copy_checkpoint(ckpt, Path(tmp) / CHECKPOINT_ARTIFACT_PATH)
            for f in staged.rglob("*.json"):
                text = f.read_text(errors="replace")
                clean = scrub_text(text)
                if clean != text:
                    f.unlink()  # a hard link: never rewrite the original
                    f.write_text(clean)
            retry_call("log checkpoint", tracking_uri, c.log_artifacts, run_id, str(staged), CHECKPOINT_ARTIFACT_PATH)


def _log_record(tracking_uri: str, run: Any, record: EvalResult, only_metrics: set[str] | None, log_curve: bool) -> None:
    """Final metrics (step 0), RTL(t) as step metric `rtl_t`, and `backbone.<metric>` as params and tags."""
    c, run_id = client(tracking_uri), run.info.run_id
    ts = int(time.time() * 1000)
    ms = [Metric(k, v, ts, 0) for k, v in record.metrics.items() if only_metrics is None or k in only_metrics]
    if log_curve:
        ms += [Metric("rtl_t", v, ts, i) for i, v in enumerate(record.rtl_curve) if math.isfinite(v)]
    for chunk in chunks(ms, MAX_METRICS_PER_BATCH):
        retry_call("log final metrics", tracking_uri, c.log_batch, run_id, metrics=list(chunk))
    if record.backbones:
        names = {f"backbone.{k}": v for k, v in record.backbones.items()}
        params = [p for p in params_of(names) if p.key not in run.data.params]
        retry_call("log backbones", tracking_uri, c.log_batch, run_id, params=params, tags=tags_of(names))


def log_final_metrics(tracking_uri: str, run_id: str, values: dict[str, float], tags: dict[str, str] | None = None) -> None:
    """Final metrics that replace earlier ones, and tags, on a run finished or not; used when a screened trial's full
    evaluation replaces its screening numbers (`sweep.full_eval`, `isosweep sync`). Each value is logged at step 0
    (the final evaluation's step: the newest one there is the one a registered model gets) and one step after the
    run's last step of any of these keys, so that MLflow's latest value (highest step) is the new one too."""
    c, ts = client(tracking_uri), int(time.time() * 1000)
    last = max((m.step for k in values for m in retry_call("get metric history", tracking_uri, c.get_metric_history, run_id, k)),
               default=0)
    ms = [Metric(k, float(v), ts, step) for k, v in values.items() if math.isfinite(v) for step in {0, last + 1}]
    for chunk in chunks(ms, MAX_METRICS_PER_BATCH):
        retry_call("log final metrics", tracking_uri, c.log_batch, run_id, metrics=list(chunk))
    if tags:
        retry_call("log tags", tracking_uri, c.log_batch, run_id, tags=tags_of(tags))


def log_sweep_summary(
    tracking_uri: str,
    parent_run_id: str,
    *,
    csv_path: str | os.PathLike | None = None,
    md_path: str | os.PathLike | None = None,
    pareto_png: str | os.PathLike | None = None,
    champion_run_id: str | None = None,
    report_dir: str | os.PathLike | None = None,
) -> None:
    """Parent run: results table (CSV, Markdown) and Pareto plot -> `results/`, report folder ->
    `report/`, tag `isosweep.champion_run_id` (a tag, so a resumed sweep can change it)."""
    c = client(tracking_uri)
    for path in (csv_path, md_path, pareto_png):
        if path and Path(path).is_file():
            retry_call("log results", tracking_uri, c.log_artifact, parent_run_id, str(path), "results")
    if report_dir and Path(report_dir).is_dir():
        retry_call("log report", tracking_uri, c.log_artifacts, parent_run_id, str(report_dir), "report")
    if champion_run_id:
        retry_call("tag champion", tracking_uri, c.set_tag, parent_run_id, TAG_CHAMPION, champion_run_id)


