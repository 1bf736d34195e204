"""The MLflow model registry: the champion and the Pareto trials logged as pyfunc models and registered.

What is registered is an MLflow pyfunc model written "from code" (`isosweep/tracking/pyfunc_model.py`, which
imports no isosweep) whose single artifact is a diffusers pipeline directory. So anyone with mlflow,
torch and diffusers can use it without isosweep:

    path = mlflow.artifacts.download_artifacts("models:/isodiff-demo@champion", dst_path="champion")
    DDPMPipeline.from_pretrained(f"{path}/artifacts/pipeline")          # PIPELINE_SUBPATH
    mlflow.pyfunc.load_model("models:/isodiff-demo@champion").predict({"n": 4, "seed": 0, "steps": 50})
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from isosweep.models.loading import find_diffusers_dir
from isosweep.tracking import client as tracking
from isosweep.tracking.artifacts import CHECKPOINT_ARTIFACT_PATH, CHECKPOINT_EXCLUDE
from isosweep.tracking.redact import scrub, scrub_text

MODEL_NAME = "model"  # the logged model's name inside a run
PIPELINE_KEY = "pipeline"  # the pyfunc artifact key
PIPELINE_SUBPATH = f"artifacts/{PIPELINE_KEY}"  # where the diffusers dir lies in a downloaded model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PIP_REQUIREMENTS = ["mlflow>=3.0", "torch>=2.4", "diffusers>=0.30", "numpy", "pandas"]
CHAMPION_ALIAS = "champion"


# --------------------------------------------------------------------------------------- logging and registering


def _stage_pipeline(pipeline_dir: Path, dst: Path) -> Path:
    """Copy the diffusers dir to `dst/pipeline` without training state, so the artifact is named `pipeline`."""
    src = find_diffusers_dir(Path(pipeline_dir)) or Path(pipeline_dir)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline_dir} holds no diffusers pipeline (model_index.json); pass a DDPMPipeline directory")
    out = dst / PIPELINE_KEY
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(*CHECKPOINT_EXCLUDE))
    for f in out.rglob("*.json"):  # spec.json keeps the weights self-describing, without credentials
        f.write_text(scrub_text(f.read_text(errors="replace")))
    return out


def log_pipeline_model(tracking_uri: str, run_id: str, pipeline_dir: str | os.PathLike) -> Any:
    """Log `pipeline_dir` as the run's MLflow 3 LoggedModel `model` (pyfunc from code). Returns ModelInfo."""
    c = tracking.client(tracking_uri)
    run = tracking.retry_call("get run", tracking_uri, c.get_run, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        staged = _stage_pipeline(Path(pipeline_dir), Path(tmp))

        def _log() -> Any:
            # Created explicitly in the run's experiment: mlflow.pyfunc.log_model would otherwise put the
            # LoggedModel in the process's active experiment (often Default) when no run is active.
            lm = c.create_logged_model(experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id)
            with tracking.use_tracking_uri(tracking_uri), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)  # predict takes a dict
                return Model.log(
                    artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=lm.model_id,
                    python_model=str(PYFUNC_CODE), artifacts={PIPELINE_KEY: str(staged)},
                    pip_requirements=PIP_REQUIREMENTS,  # skips dependency inference: 0.3 s instead of 8 s
                )

        return tracking.retry_call("log model", tracking_uri, _log)


def _ensure_registered_model(tracking_uri: str, name: str) -> None:
    c = tracking.client(tracking_uri)
    try:
        tracking.retry_call("create registered model", tracking_uri, c.create_registered_model, name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def _existing_version(tracking_uri: str, name: str, run_id: str) -> Any | None:
    c = tracking.client(tracking_uri)
    found = tracking.retry_call("search model versions", tracking_uri, c.search_model_versions, f"name='{name}' and run_id='{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def log_and_register(
    tracking_uri: str,
    run_id: str,
    pipeline_dir: str | os.PathLike,
    registry_name: str,
    alias: str | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    *,
    reuse: bool = True,
) -> str:
    """Log `pipeline_dir` as the run's model and register it as a new version of `registry_name`.

    reuse=True: if the registry already has a version from this run (a resumed sweep), that version
    is updated (tags, description, alias) instead of adding a duplicate. Returns the version string.
    """
    c = tracking.client(tracking_uri)
    _ensure_registered_model(tracking_uri, registry_name)
    mv = _existing_version(tracking_uri, registry_name, run_id) if reuse else None
    clean_tags = {k: scrub(k, v) for k, v in (tags or {}).items()}
    desc = scrub_text(description) if description else None
    if mv is None:
        info = log_pipeline_model(tracking_uri, run_id, pipeline_dir)

        def _create() -> Any:
            # the registry resolves a models:/<model_id> source through the fluent tracking URI
            with tracking.use_tracking_uri(tracking_uri):
                return c.create_model_version(registry_name, info.model_uri, run_id=run_id, tags=clean_tags,
                                              description=desc, model_id=info.model_id)

        mv = tracking.retry_call("create model version", tracking_uri, _create,
                                 already_done=lambda: _existing_version(tracking_uri, registry_name, run_id))
    else:
        for k, v in clean_tags.items():
            tracking.retry_call("tag model version", tracking_uri, c.set_model_version_tag, registry_name, mv.version, k, v)
        if desc:
            tracking.retry_call("describe model version", tracking_uri, c.update_model_version, registry_name, mv.version, desc)
    if alias:
        tracking.retry_call("set alias", tracking_uri, c.set_registered_model_alias, registry_name, alias, mv.version)
    return str(mv.version)


def _row_of(row: Any) -> Mapping[str, Any]:
    """A results row from a dict, or from an object carrying one as `.row` (selection.Choice)."""
    if isinstance(row, Mapping):
        return row
    inner = getattr(row, "row", None)
    return inner if isinstance(inner, Mapping) else {}


def _run_id_of(row: Any) -> str | None:
    if isinstance(row, str):
        return row or None
    r = _row_of(row)
    return r.get("mlflow_run_id") or r.get("run_id") or None


def _description(row: Mapping[str, Any]) -> str:
    """The version description: its metrics row as a Markdown table plus the JSON."""
    shown = {k: v for k, v in row.items() if k not in ("checkpoint_path",) and not isinstance(v, (dict, list))}
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)
    head = "| " + " | ".join(shown) + " |\n|" + "---|" * len(shown) + "\n| " + " | ".join(fmt(v) for v in shown.values()) + " |"
    return head + "\n\n" + json.dumps(shown, default=str, sort_keys=True)


def _pipeline_for(tracking_uri: str, run_id: str, row: Mapping[str, Any], tmp: Path) -> Path:
    """The run's pipeline dir: the row's local checkpoint_path if it is here, else the run's `checkpoint/` artifacts."""
    local = row.get("checkpoint_path") or ""
    if local and "://" not in local and (Path(local) / "model_index.json").is_file():
        return Path(local)
    c = tracking.client(tracking_uri)
    if tracking.retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, CHECKPOINT_ARTIFACT_PATH):
        dst = tmp / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return Path(tracking.retry_call(
            "download checkpoint", tracking_uri, mlflow.artifacts.download_artifacts,
            run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT_PATH, dst_path=str(dst), tracking_uri=tracking_uri,
        ))
    raise FileNotFoundError(f"run {run_id} has no '{CHECKPOINT_ARTIFACT_PATH}/' artifacts and no local checkpoint_path ({local!r})")


def current_champion(tracking_uri: str, name: str) -> str | None:
    """The version the `champion` alias points at now, or None (no such model or alias)."""
    try:
        return str(tracking.client(tracking_uri).get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def register_sweep_models(
    tracking_uri: str,
    registry_name: str,
    champion: Any,
    pareto: Iterable[Any] = (),
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    extra_tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Register the champion (alias `champion`) and every Pareto trial (tag `pareto=true`).

    champion / pareto: result rows (dicts with `mlflow_run_id` and `checkpoint_path`, as in the
    sweep's results table), objects with such a `.row`, or plain run ids; rows: all result rows, used
    to find a run's metrics row for the version description. The pipeline comes from the row's
    local checkpoint_path when it exists on this machine, else from the run's `checkpoint/` artifacts.
    Returns {run_id: version}. Rows without a run id are skipped.
    """
    by_run = {_run_id_of(r): _row_of(r) for r in rows if _run_id_of(r)}
    champ_id = _run_id_of(champion)
    pareto_ids = [rid for rid in (_run_id_of(p) for p in pareto) if rid]
    for p in pareto:
        if _run_id_of(p) and _run_id_of(p) not in by_run:
            by_run[_run_id_of(p)] = _row_of(p)
    if champ_id and champ_id not in by_run:
        by_run[champ_id] = _row_of(champion)
    order = ([champ_id] if champ_id else []) + [r for r in pareto_ids if r != champ_id]
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rid in order:
            row = by_run.get(rid, {})
            tags = {"pareto": str(rid in pareto_ids).lower(), "champion": str(rid == champ_id).lower()}
            if row.get("trial_id"):
                tags["trial_id"] = row["trial_id"]
            tags.update(extra_tags or {})
            pipe = _pipeline_for(tracking_uri, rid, row, Path(tmp))
            out[rid] = log_and_register(
                tracking_uri, rid, pipe, registry_name,
                alias=CHAMPION_ALIAS if rid == champ_id else None, tags=tags, description=_description(row) if row else None,
            )
    return out


