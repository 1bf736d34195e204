"""The MLflow model registry: the champion and the Pareto trials logged as pyfunc models and registered.

What is registered is an MLflow pyfunc model written "from code" (`isosweep/tracking/pyfunc_model.py`, with the
few isosweep modules it imports, `SERVED_CODE`, logged beside it) whose single artifact is a diffusers pipeline
directory, with the request signature of that file, an input example (`INPUT_EXAMPLE`), requirements pinned to the
installed versions, and the trial's final metrics and params on its LoggedModel. So anyone with mlflow, torch, diffusers and pillow can use or serve it without isosweep:

    path = mlflow.artifacts.download_artifacts("models:/isodiff-demo@champion", dst_path="champion")
    DDPMPipeline.from_pretrained(f"{path}/artifacts/pipeline")          # PIPELINE_SUBPATH
    pngs = mlflow.pyfunc.load_model("models:/isodiff-demo@champion").predict(None, params={"n": 4, "seed": 0, "steps": 50})
    # mlflow models serve -m models:/isodiff-demo@champion --env-manager local  (docs/tracking.md#serving-the-champion)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import mlflow
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from isosweep.console import warn
from isosweep.models.sources import find_diffusers_dir, is_latent_pipeline
from isosweep.redact import scrub, scrub_text
from isosweep.tracking import client as tracking
from isosweep.tracking.artifacts import CHECKPOINT_ARTIFACT_PATH, CHECKPOINT_EXCLUDE, CheckpointArtifactError, verify_checkpoint_artifact

MODEL_NAME = "model"  # the logged model's name inside a run
MODEL_TYPE = "diffusers-ddpm"  # the LoggedModel's model_type, to search and compare them in the MLflow UI
PIPELINE_KEY = "pipeline"  # the pyfunc artifact key
PIPELINE_SUBPATH = f"artifacts/{PIPELINE_KEY}"  # where the diffusers dir lies in a downloaded model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# The isosweep modules the served model imports (the served modes and the core math they call), logged with it as
# MLflow's code_paths so that a server needs no isosweep installed; tests/test_layers.py holds this list to the imports.
SERVED_CODE = ("__init__.py", "core/__init__.py", "core/codec.py", "core/editing.py", "core/hspace.py", "core/inversion.py",
               "core/progress.py", "core/sampling.py", "tracking/__init__.py", "tracking/serving_modes.py")
# The request logged as the model's input example (serving_input_example.json): two rows, four samples and one edit,
# cheap on any model (10 DDIM steps; 59 + 60 UNet evaluations, far below the default budget).
INPUT_EXAMPLE_FILE = "serving_input_example.json"  # MLflow writes it into the model folder from INPUT_EXAMPLE
INPUT_EXAMPLE = [{"mode": "none", "n": 4, "seed": 0, "steps": 10},
                 {"mode": "edit", "seed": 0, "steps": 10, "t": 500, "directions": [0], "gammas": [-8.0, 0.0, 8.0], "iterations": 2}]
# MLflow warns, each time the pyfunc class is defined (importing pyfunc_model.py; save_model loads it again), that its
# predict has no type hints: on purpose, SIGNATURE says what a request holds. Its message starts with a colour code.
NO_TYPE_HINTS = r".*Add type hints to the `predict` method"


@contextlib.contextmanager
def without_type_hint_warning():
    """Drops MLflow's NO_TYPE_HINTS warning and shows every other one. A filter is not enough: MLflow raises it under
    its own `simplefilter("once")`, ahead of ours, so it is dropped where warnings are shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_TYPE_HINTS, category=UserWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not (issubclass(category, UserWarning) and re.match(NO_TYPE_HINTS, str(message))):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
# What the served model imports, pinned to the versions installed here (the ones it was logged and tested with).
# Local version labels (torch's "+cu124") are dropped so that pip can install them from PyPI.
SERVING_PACKAGES = ("mlflow", "torch", "diffusers", "numpy", "pillow", "pandas", "safetensors")
CHAMPION_ALIAS = "champion"


# --------------------------------------------------------------------------------------- logging and registering


def _stage_pipeline(pipeline_dir: Path, dst: Path) -> Path:
    """Copy the diffusers dir to `dst/pipeline` without training state, so the artifact is named `pipeline`."""
    src = find_diffusers_dir(Path(pipeline_dir)) or Path(pipeline_dir)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline_dir} holds no diffusers pipeline (model_index.json); pass a DDPMPipeline directory")
    if is_latent_pipeline(src):  # the served model's DDIM has no decoder: it would answer with latents as images
        raise ValueError(f"{pipeline_dir} is a latent diffusion model (LDMPipeline); the served model handles pixel-space "
                         "models only, so it is not registered (docs/training.md, \"Latent diffusion\")")
    out = dst / PIPELINE_KEY
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(*CHECKPOINT_EXCLUDE))
    for f in out.rglob("*.json"):  # spec.json keeps the weights self-describing, without credentials
        f.write_text(scrub_text(f.read_text(errors="replace")))
    return out


def pip_requirements() -> list[str]:
    """`SERVING_PACKAGES` pinned to their installed versions: ["mlflow==3.17.2", "torch==2.14.1", ...]."""
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in SERVING_PACKAGES]


def _final_metrics(tracking_uri: str, run_id: str, keys: Iterable[str], step: int = 0) -> list[Metric]:
    """The run's metrics at `step` (the final evaluation is logged at step 0) not yet linked to a model; of several
    values of a key there, the newest (a screened trial's full evaluation replaces its screening numbers)."""
    c = tracking.client(tracking_uri)
    out = []
    for key in keys:
        history = tracking.retry_call("get metric history", tracking_uri, c.get_metric_history, run_id, key)
        at_step = [m for m in history if m.step == step and m.model_id is None]
        out += [max(at_step, key=lambda m: m.timestamp)] if at_step else []
    return out


def pyfunc_signature():
    """The served model's SIGNATURE, its module imported here (when a model is logged) without MLflow's NO_TYPE_HINTS
    warning, which would otherwise reach the terminal at every registration."""
    with without_type_hint_warning():
        from isosweep.tracking.pyfunc_model import SIGNATURE
    return SIGNATURE


def save_served_model(path: Path, pipeline_dir: Path, mlflow_model: Model | None = None) -> None:
    """Write the served model to the new folder `path`: pyfunc_model.py as its code with SERVED_CODE beside it, the
    pipeline folder `pipeline_dir` as its artifact, SIGNATURE, the input example, pinned requirements."""
    package = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "isosweep"
        for name in SERVED_CODE:
            (code / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / name, code / name)
        with without_type_hint_warning():  # save_model loads the code again
            mlflow.pyfunc.save_model(
                path=str(path), python_model=str(PYFUNC_CODE), artifacts={PIPELINE_KEY: str(pipeline_dir)}, code_paths=[str(code)],
                signature=pyfunc_signature(), input_example=INPUT_EXAMPLE,
                pip_requirements=pip_requirements(),  # pinned here: MLflow's inference loads the model (8 s)
                mlflow_model=mlflow_model,
            )


def log_pipeline_model(tracking_uri: str, run_id: str, pipeline_dir: str | os.PathLike) -> LoggedModel:
    """Log `pipeline_dir` as the run's MLflow 3 LoggedModel `model` (pyfunc from code, SIGNATURE, pinned requirements).

    What `mlflow.pyfunc.log_model` does, through a client bound to `tracking_uri` (log_model goes through the
    process-wide tracking URI and the active experiment): the LoggedModel is created in the run's experiment
    with the run's params, the model saved with `mlflow.pyfunc.save_model` and uploaded, recorded as the run's
    output at step 0, its metrics at step 0 (fid, ppl, ... as `artifacts.log_trial_result` logs them) linked to it
    (the model page of the MLflow UI shows them), and marked READY (FAILED if any of this fails).
    """
    c = tracking.client(tracking_uri)
    run = tracking.retry_call("get run", tracking_uri, c.get_run, run_id)
    lm = tracking.retry_call(
        "create logged model", tracking_uri, c.create_logged_model, experiment_id=run.info.experiment_id, name=MODEL_NAME,
        source_run_id=run_id, params=dict(run.data.params), model_type=MODEL_TYPE,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staged = _stage_pipeline(Path(pipeline_dir), Path(tmp))
            local = Path(tmp) / "mlflow_model"
            save_served_model(local, staged, Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id,
                                                   model_id=lm.model_id))
            tracking.retry_call("upload model", tracking_uri, c.log_model_artifacts, lm.model_id, str(local))
        tracking.retry_call("log run output", tracking_uri, c.log_outputs, run_id, [LoggedModelOutput(lm.model_id, step=0)])
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=lm.model_id, run_id=run_id)
                  for m in _final_metrics(tracking_uri, run_id, run.data.metrics)]
        for chunk in tracking.chunks(linked, tracking.MAX_METRICS_PER_BATCH):
            tracking.retry_call("link metrics to the model", tracking_uri, c.log_batch, run_id, metrics=list(chunk))
    except BaseException:
        with contextlib.suppress(Exception):  # the error that got us here is the one to see
            c.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    return tracking.retry_call("finalize logged model", tracking_uri, c.finalize_logged_model, lm.model_id, LoggedModelStatus.READY)


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
        lm = log_pipeline_model(tracking_uri, run_id, pipeline_dir)

        # models:/<model id> links the version to its LoggedModel in the UI; a tracking server resolves it in
        # its own process, but a local store (sqlite) would resolve it through the process-wide tracking URI,
        # which may name another store: there the source is the model's storage location.
        source = f"models:/{lm.model_id}" if tracking_uri.startswith(("http://", "https://")) else lm.artifact_location

        def _create() -> Any:
            return c.create_model_version(registry_name, source, run_id=run_id, tags=clean_tags, description=desc,
                                          model_id=lm.model_id)

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


def _verified_pipeline(tracking_uri: str, run_id: str, row: Mapping[str, Any], tmp: Path) -> Path:
    """The run's pipeline dir, once its `checkpoint/` artifact verifies against the checkpoint's manifest
    (`artifacts.verify_checkpoint_artifact`): the row's local checkpoint_path if it is here (the artifact checked by
    file sizes), else the artifact downloaded (checked by sizes and sha256). CheckpointArtifactError otherwise."""
    local = row.get("checkpoint_path") or ""
    trial_id = str(row.get("trial_id") or run_id)
    if local and "://" not in local and (Path(local) / "model_index.json").is_file():
        verify_checkpoint_artifact(tracking_uri, run_id, trial_id, local=Path(local))
        return Path(local)
    c = tracking.client(tracking_uri)
    if not tracking.retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, CHECKPOINT_ARTIFACT_PATH):
        raise CheckpointArtifactError(trial_id, run_id, [f"the run has none, and the checkpoint ({local or 'no path'}) is not on this machine"])
    dst = tmp / run_id
    dst.mkdir(parents=True, exist_ok=True)
    path = Path(tracking.retry_call(
        "download checkpoint", tracking_uri, mlflow.artifacts.download_artifacts,
        run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT_PATH, dst_path=str(dst), tracking_uri=tracking_uri,
    ))
    verify_checkpoint_artifact(tracking_uri, run_id, trial_id, downloaded=path)
    return path


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
    sweep: str = "SWEEP_URI",
) -> dict[str, str]:
    """Register the champion (alias `champion`) and every Pareto trial (tag `pareto=true`).

    champion / pareto: result rows (dicts with `mlflow_run_id` and `checkpoint_path`, as in the
    sweep's results table), objects with such a `.row`, or plain run ids; rows: all result rows, used
    to find a run's metrics row for the version description. The pipeline comes from the row's
    local checkpoint_path when it exists on this machine, else from the run's `checkpoint/` artifacts.
    Returns {run_id: version}. Rows without a run id are skipped.

    Every run's `checkpoint/` artifact is verified against the checkpoint's manifest before anything is registered
    (`_verified_pipeline`): when the champion's fails, CheckpointArtifactError and nothing is registered (the alias
    stays); a Pareto trial's that fails is not registered, with a warning naming the trial and the fix (`sweep`: the
    sweep as the fix names it).
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
        pipes, refused = {}, []
        for rid in order:
            try:
                pipes[rid] = _verified_pipeline(tracking_uri, rid, by_run.get(rid, {}), Path(tmp))
            except CheckpointArtifactError as exc:
                if rid == champ_id:
                    raise
                refused.append(exc)
        for exc in refused:
            warn(exc.line(sweep))
        for rid in (r for r in order if r in pipes):
            row = by_run.get(rid, {})
            tags = {"pareto": str(rid in pareto_ids).lower(), "champion": str(rid == champ_id).lower()}
            if row.get("trial_id"):
                tags["trial_id"] = row["trial_id"]
            tags.update(extra_tags or {})
            out[rid] = log_and_register(
                tracking_uri, rid, pipes[rid], registry_name,
                alias=CHAMPION_ALIAS if rid == champ_id else None, tags=tags, description=_description(row) if row else None,
            )
    return out


