"""A trial's final metrics and artifacts (checkpoint, evaluation record) and the sweep's results, logged to MLflow."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from mlflow.entities import Metric

from isosweep.core.names import CHEAP_FID
from isosweep.evaluation.record import EVAL_DIR, EvalResult, read_record
from isosweep.redact import scrub_text
from isosweep.results.plots import rtl_plot
from isosweep.tracking.client import MAX_METRICS_PER_BATCH, chunks, client, params_of, retry_call, tags_of
from isosweep.tracking.runs import TAG_CHAMPION
from isosweep.training.best_step import BEST_DIR, selection_columns
from isosweep.training.checkpoint import MANIFEST, CorruptCheckpointError, file_sha256, read_manifest

CHECKPOINT_ARTIFACT_PATH = "checkpoint"
EVAL_ARTIFACT_PATH = EVAL_DIR
# Files of a checkpoint directory that are training state, not the model (best/: the selected weights for resume;
# in the final checkpoint they are the pipeline's own unet/).
CHECKPOINT_EXCLUDE = ("train_state.pt", "eval", BEST_DIR, "__pycache__", "*.lock")
TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".csv")  # scrubbed of credentials before upload
_PROBLEMS_SHOWN = 4  # problems named in one line; the rest are counted


class CheckpointArtifactError(RuntimeError):
    """A trial's `checkpoint/` artifact in MLflow that does not match its checkpoint (a partial or damaged upload):
    no model is registered from it and no alias moves; `isosweep sync` uploads it again."""

    deterministic = True  # the stored files stay as they are until sync repairs them (isosweep.errors)

    def __init__(self, trial_id: str, run_id: str, problems: list[str]) -> None:
        self.trial_id, self.run_id, self.problems = trial_id, run_id, problems
        super().__init__(self.line("SWEEP_URI"))

    def line(self, sweep: str) -> str:
        """The one line a user reads, with the sweep named as they gave it."""
        shown = self.problems[:_PROBLEMS_SHOWN] + ([f"{len(self.problems) - _PROBLEMS_SHOWN} more"]
                                                   if len(self.problems) > _PROBLEMS_SHOWN else [])
        return (f"trial {self.trial_id} (run {self.run_id}): its {CHECKPOINT_ARTIFACT_PATH}/ artifact in MLflow is incomplete "
                f"({'; '.join(shown)}), so it is not registered and no alias moves; fix: `isosweep sync {sweep}` then "
                f"`isosweep promote {sweep} --trial {self.trial_id}`")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a diffusers checkpoint without training state (hard links where possible)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*CHECKPOINT_EXCLUDE), copy_function=link_or_copy)
    return dst


def stage_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint folder exactly as it is uploaded to `checkpoint/`: no training state, JSON scrubbed of credentials;
    the manifest's entries of files the scrubbing rewrote describe the bytes uploaded, so the artifact verifies."""
    staged = _copy_checkpoint(src, dst)
    rewritten = {}
    for f in staged.rglob("*.json"):
        text = f.read_text(errors="replace")
        clean = scrub_text(text)
        if clean != text:
            f.unlink()  # a hard link: never rewrite the original
            f.write_text(clean)
            rewritten[f.relative_to(staged).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    manifest = staged / MANIFEST
    if rewritten and manifest.is_file():
        data = json.loads(manifest.read_text())
        data["files"].update({rel: entry for rel, entry in rewritten.items() if rel in data["files"]})
        manifest.unlink()
        manifest.write_text(json.dumps(data, indent=1, sort_keys=True))
    return staged


def is_uploaded(rel: str) -> bool:
    """Whether the checkpoint file at `rel` (relative to the checkpoint) goes into `checkpoint/` (not training state)."""
    return not any(fnmatch.fnmatch(part, pattern) for part in PurePosixPath(rel).parts for pattern in CHECKPOINT_EXCLUDE)


def artifact_sizes(tracking_uri: str, run_id: str, path: str = CHECKPOINT_ARTIFACT_PATH) -> dict[str, int]:
    """{path relative to `path`: size in bytes} of every file under a run's artifact folder (empty when there is none)."""
    c, out, folders = client(tracking_uri), {}, [path]
    while folders:
        for info in retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, folders.pop()):
            if info.is_dir:
                folders.append(info.path)
            else:
                out[PurePosixPath(info.path).relative_to(path).as_posix()] = int(info.file_size or 0)
    return out


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _differences(expected: dict[str, int], found: dict[str, int], source: str) -> list[str]:
    """What of `expected` ({file: size}) `found` lacks or holds with another size, one phrase per file."""
    out = []
    for rel, size in sorted(expected.items()):
        if rel not in found:
            out.append(f"{rel} is missing")
        elif found[rel] != size:
            out.append(f"{rel} has {found[rel]} bytes, {source} says {size}")
    return out


def checkpoint_gaps(tracking_uri: str, run_id: str, checkpoint_dir: str | os.PathLike,
                    elsewhere: Mapping[str, int] | None = None) -> list[str]:
    """What the run's `checkpoint/` artifact lacks of the local checkpoint (by file name and size); empty when complete.
    `elsewhere`: {path: size} of the checkpoint's files not copied here (a sweep in S3 read from its listing)."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_checkpoint(Path(checkpoint_dir), Path(tmp) / CHECKPOINT_ARTIFACT_PATH)
        expected = {**{rel: size for rel, size in (elsewhere or {}).items() if is_uploaded(rel)}, **_file_sizes(staged)}
        return _differences(expected, artifact_sizes(tracking_uri, run_id), "the local checkpoint")


def verify_checkpoint_artifact(tracking_uri: str, run_id: str, trial_id: str, *, local: Path | None = None,
                               downloaded: Path | None = None) -> None:
    """Check the run's `checkpoint/` artifact against the checkpoint's manifest before a model is registered from it:
    every file the manifest lists (training state aside) present with its size, and with its sha256 when the artifact
    was downloaded to `downloaded`. The manifest is the local checkpoint's (`local`) when it is on this machine, else
    the artifact's own; without one, the local checkpoint's files. CheckpointArtifactError names what is wrong."""
    found = artifact_sizes(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_checkpoint(local, Path(tmp) / CHECKPOINT_ARTIFACT_PATH) if local is not None else None
        manifest, problems = None, []
        try:
            if staged is not None and (staged / MANIFEST).is_file():
                manifest = read_manifest(str(local), (staged / MANIFEST).read_bytes())
            elif MANIFEST in found:
                manifest = read_manifest(f"run {run_id} {CHECKPOINT_ARTIFACT_PATH}/", _artifact_bytes(tracking_uri, run_id, downloaded, tmp))
        except CorruptCheckpointError as exc:
            problems.append(exc.problem)
        if manifest is not None:
            expected = {rel: e["size"] for rel, e in manifest["files"].items() if is_uploaded(rel)}
            if staged is not None:
                expected[MANIFEST] = (staged / MANIFEST).stat().st_size
            problems += _differences(expected, found, "the manifest")
            if downloaded is not None:
                problems += [f"the sha256 of {rel} differs from the manifest's" for rel in sorted(expected)
                             if rel in manifest["files"] and (downloaded / rel).is_file()
                             and (downloaded / rel).stat().st_size == expected[rel]
                             and file_sha256(downloaded / rel) != manifest["files"][rel]["sha256"]]
        elif staged is not None:
            problems += _differences(_file_sizes(staged), found, "the local checkpoint")
        elif not problems:
            problems.append(f"it has no {MANIFEST}" if found else "it is empty or absent")
    if problems:
        raise CheckpointArtifactError(trial_id, run_id, problems)


def _artifact_bytes(tracking_uri: str, run_id: str, downloaded: Path | None, tmp: str) -> bytes:
    """The artifact's manifest.json: from the downloaded copy, else downloaded alone."""
    if downloaded is not None and (downloaded / MANIFEST).is_file():
        return (downloaded / MANIFEST).read_bytes()
    path = retry_call("download manifest", tracking_uri, mlflow.artifacts.download_artifacts, run_id=run_id,
                      artifact_path=f"{CHECKPOINT_ARTIFACT_PATH}/{MANIFEST}", dst_path=str(Path(tmp) / "artifact"), tracking_uri=tracking_uri)
    return Path(path).read_bytes()


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
            staged = stage_checkpoint(ckpt, Path(tmp) / CHECKPOINT_ARTIFACT_PATH)
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


