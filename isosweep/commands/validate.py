"""`isosweep validate SPEC`: check a spec file and print the resolved config; and `preflight`, the checks of
what the spec points at that `validate` and `run` make before Ray starts.

`preflight(spec, source)` raises `SpecError` (exit 2) naming the file, the field and the fix when:
- evaluation.metrics names a metric no module of evaluation/suite_metrics registers (`check_metric_names`);
- the base model cannot be found: a local folder without a UNet config.json; a hub id that is neither in
  the local Hugging Face cache nor (when online) on the hub, and with HF_HUB_OFFLINE=1 the cache alone
  counts; an MLflow URI (`models:/`, `runs:/`, an artifact URI) that its tracking server does not have
  (a registered name, alias or version), or a tracking server that cannot be reached. The server is the one
  the sweep tracks to: --tracking-uri (default ISOSWEEP_TRACKING_URI), `tracking.uri`, MLFLOW_TRACKING_URI, else the
  local store under the storage path, ISOSWEEP_STORAGE or `storage.path` (`tracking.client.resolve_tracking_uri`), so
  `models:/NAME@champion` of the previous sweep is found;
- with `deep=True`: any image of an image_folder dataset cannot be decoded (`data.imagefiles`; cached).

`validate --deep` also prints, per metric, the feature network it will use: for Inception and AlexNet the
weight file, its sha256 and whether it is the published file (`backbone_lines`).

MLflow is imported only for an MLflow base model, so `isosweep validate` of other specs starts without it; torch
only for a metric that is not built in, whose module registers its name. Where torch is not installed (the client
install of requirements/client.txt) such names are left to `run`, with a note.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NamedTuple

import yaml
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from isosweep.console import note, result, result_json
from isosweep.constants import EXIT_COMPLETED, STORAGE_ENV
from isosweep.data.imagefiles import ImageScan, scan_image_folder
from isosweep.redact import scrub_text, scrub_tree
from isosweep.spec import EVAL_METRICS, SpecError, SweepSpec, load_spec

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what UNet2DModel.from_pretrained reads


class Preflight(NamedTuple):
    """What `preflight` found: where the base model is (one line of text) and the image scan, when one ran."""

    base_model: str
    scan: ImageScan | None


def validate_command(args: argparse.Namespace) -> int:
    if args.deep and args.no_path_checks:
        raise SpecError(f"{args.spec}: --deep reads the image folder and --no-path-checks skips it; fix: drop one of them")
    spec = load_spec(args.spec, args.overrides, check_paths=not args.no_path_checks)
    found, networks = None, None
    if args.no_path_checks:
        check_metric_names(spec, args.spec)  # preflight checks them otherwise
    else:  # stdout is the resolved spec alone (it can be piped to a file): notes go to stderr
        # the local store of a sweep run with ISOSWEEP_STORAGE lies under it (validate takes no --storage)
        found = preflight(spec, args.spec, tracking_uri=args.tracking_uri, deep=args.deep, storage=os.environ.get(STORAGE_ENV) or None)
        note(scrub_text(f"base model: {found.base_model}"))
        if found.scan is not None:
            note(scrub_text(found.scan.summary()))
        if args.deep:
            networks = backbone_lines(spec, args.spec)
            note(scrub_text("feature networks:\n" + "\n".join(f"  {line}" for line in networks)))
    # every URI printed scrubbed (a terminal and a CI log keep them): the tracking URI, storage, base model
    if getattr(args, "json", False):
        result_json(scrub_tree({"spec_file": str(args.spec), "name": spec.name, "valid": True, "spec": spec.to_dict(),
                                "base_model": found.base_model if found else None,
                                "images": found.scan.summary() if found and found.scan is not None else None,
                                "feature_networks": networks}))
    else:
        result(yaml.safe_dump(scrub_tree(spec.to_dict()), sort_keys=False), end="")
    note(scrub_text(f"ok: {args.spec} is a valid sweep spec"))
    return EXIT_COMPLETED


def preflight(spec: SweepSpec, source: str, *, tracking_uri: str | None = None, deep: bool = False,
              progress: bool = True, cache_dir: str | os.PathLike | None = None, storage: str | None = None) -> Preflight:
    """Check, before Ray starts, that the base model exists and (deep) that every dataset image decodes.

    `source` names the spec in messages (its path). `tracking_uri` is where an MLflow base model is looked
    up (default: the spec's `tracking.uri`, then MLFLOW_TRACKING_URI, then the local store under `storage`, default
    the spec's `storage.path`). `deep` scans an image_folder
    dataset with `scan_image_folder` (progress bar on stderr; result cached in `cache_dir`, default
    $ISOSWEEP_CACHE/scans or ~/.cache/isosweep/scans). Raises SpecError; prints nothing itself.
    """
    check_metric_names(spec, source)
    where = check_base_model(spec, source, tracking_uri=tracking_uri, storage=storage)
    ds = spec.dataset
    if not deep or ds.kind != "image_folder" or not ds.path or "://" in ds.path:
        return Preflight(where, None)
    scan = scan_image_folder(ds.path, cache_dir=cache_dir, progress=progress)
    if scan.files == 0:
        raise SpecError(f"{source}: field 'dataset.path': no images under {ds.path!r}; fix: point it at the folder that holds the images")
    if scan.unreadable:
        raise SpecError(f"{source}: field 'dataset.path': {len(scan.unreadable)} of {scan.files} image(s) under {ds.path!r} "
                        f"cannot be decoded:\n{scan.problems()}\n  fix: delete or re-encode these files, then run "
                        f"`isosweep validate --deep {source}` again (unchanged folders are not decoded twice)")
    return Preflight(where, scan)


def check_metric_names(spec: SweepSpec, source: str) -> None:
    """SpecError unless every name in evaluation.metrics is a metric some module of evaluation/suite_metrics registers
    (the spec checks built-in names itself; an added metric's name needs its module, so torch, only then)."""
    added = [m for m in spec.evaluation.metrics if m not in EVAL_METRICS]
    if not added:
        return
    try:
        from isosweep.evaluation.suite_metrics import REGISTRY
        from isosweep.evaluation.suite_metrics.base import unknown_metrics_message
    except ModuleNotFoundError as exc:  # the light client install (requirements/client.txt) has no torch
        if (exc.name or "").split(".")[0] not in ("torch", "diffusers"):
            raise
        note(f"{source}: evaluation.metrics {', '.join(added)}: not built in; their modules need {exc.name}, which is not "
             "installed here (a client install), so `run` checks these names where it is")
        return

    unknown = [m for m in added if m not in REGISTRY]
    if unknown:
        raise SpecError(f"{source}: {unknown_metrics_message(unknown)}")


def backbone_lines(spec: SweepSpec, source: str) -> list[str]:
    """Per evaluation metric, the network it will use (weight file, sha256, published or not); SpecError when the
    spec's evaluation.backbone cannot be had here, as `run` would fail."""
    # imported here: the resolver pulls in torch and the metrics, which plain `validate` does not need
    from isosweep.evaluation.features.common import BackboneUnavailable
    from isosweep.evaluation.features.resolver import describe_backbones

    try:
        return describe_backbones(spec.evaluation, spec.dataset, list(spec.evaluation.metrics))
    except BackboneUnavailable as exc:
        raise SpecError(f"{source}: field 'evaluation.backbone': {exc}") from None


def check_base_model(spec: SweepSpec, source: str, *, tracking_uri: str | None = None, storage: str | None = None) -> str:
    """SpecError unless `base_model.source` can be loaded; returns where it was found (for a progress line)."""
    src, sub = spec.base_model.source, spec.base_model.subfolder
    if src.startswith("builtin:"):
        return "built in (pretrained and cached by the sweep when missing)"
    if ":/" in src:  # models:/, runs:/, mlflow-artifacts:/, s3://...: what models.loading.is_model_uri fetches
        named = tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        return _check_mlflow_model(src, source, named or _local_store(storage or spec.storage.path))
    local = Path(os.path.expanduser(src))
    if local.exists():
        unet = local / sub if sub else (local / "unet" if (local / "unet" / "config.json").is_file() else local)
        if not (unet / "config.json").is_file():
            raise SpecError(f"{source}: field 'base_model.source': {src!r} has no UNet config.json (looked in {unet}); "
                            "fix: point it at a diffusers pipeline folder (with unet/) or a UNet folder, or set base_model.subfolder")
        return f"local folder {unet}"
    return _check_hub(src, sub, source)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} if value is not None else bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    """The HF hub cache folder as the environment says now (HF_HUB_CACHE, then HF_HOME/hub)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _check_hub(repo_id: str, subfolder: str | None, source: str) -> str:
    """A hub id: its UNet config and weights in the local cache, else (online) the repo on the hub."""
    field = f"{source}: field 'base_model.source'"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SpecError(f"{field}: {repo_id!r} is no local path, MLflow URI or hub id; fix: give a diffusers folder that "
                        "exists, a hub id such as google/ddpm-ema-celebahq-256, or models:/NAME@alias") from None
    cache = _hub_cache()
    folders = [subfolder] if subfolder else ["", "unet"]  # where models.loading looks: the root, then unet/
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        config = try_to_load_from_cache(repo_id, f"{prefix}config.json", cache_dir=cache)
        weights = [try_to_load_from_cache(repo_id, prefix + w, cache_dir=cache) for w in WEIGHT_FILES]
        if isinstance(config, str) and any(isinstance(w, str) for w in weights):
            return f"hub id {repo_id} in the local HF cache {cache}"
    fix = (f"fix: download it where there is network (`hf download {repo_id}`) into this machine's HF cache "
           f"({cache}; HF_HOME moves it) and set HF_HUB_OFFLINE=1, or point base_model.source at a local diffusers folder")
    if _hub_offline():
        raise SpecError(f"{field}: {repo_id!r} is not a local folder, and HF_HUB_OFFLINE is set but its UNet (config.json "
                        f"and weights{' in ' + subfolder if subfolder else ''}) is not in the local HF cache {cache}; {fix}")
    try:
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo_id, timeout=15)
    except GatedRepoError:
        raise SpecError(f"{field}: {repo_id!r} is gated on the hub; fix: accept its terms on huggingface.co and log in "
                        "(`hf auth login` or HF_TOKEN), or pre-download it") from None
    except RepositoryNotFoundError:
        raise SpecError(f"{field}: no model {repo_id!r} on the hub (or it is private) and no local folder of that name; "
                        "fix: check the id (e.g. google/ddpm-ema-celebahq-256), log in for a private model, or give a local path") from None
    except Exception as exc:  # noqa: BLE001 - network errors of any kind: the hub cannot be asked
        raise SpecError(f"{field}: {repo_id!r} is not in the local HF cache {cache} and the hub could not be reached "
                        f"({type(exc).__name__}: {exc}); {fix}") from None
    names = {s.rfilename for s in info.siblings or []}
    if names and not any(f"{f}/config.json".lstrip("/") in names for f in folders):
        raise SpecError(f"{field}: the hub model {repo_id!r} has no UNet config.json in {folders}; "
                        "fix: set base_model.subfolder to the folder that holds the UNet")
    return f"hub id {repo_id} on the hub (downloaded by each worker)"


def _local_store(storage: str) -> str | None:
    """The local SQLite store a sweep under `storage` tracks to when no URI is named, if it exists (no file is created)."""
    if "://" in storage or not Path(storage).expanduser().is_dir():
        return None
    from isosweep.tracking.client import resolve_tracking_uri  # MLflow: only for an MLflow base model

    uri = resolve_tracking_uri(None, None, storage)
    return uri if Path(uri.removeprefix("sqlite:///")).is_file() else None


def _check_mlflow_model(uri: str, source: str, tracking_uri: str | None) -> str:
    """An MLflow model or artifact URI: listed (not downloaded) at its tracking server."""
    # imported here, not at the top: MLflow (seconds) only for specs whose base model lives in MLflow
    from mlflow.artifacts import list_artifacts
    from mlflow.exceptions import MlflowException

    from isosweep.tracking.client import TrackingError, artifact_location, retry_call

    field = f"{source}: field 'base_model.source'"
    if not tracking_uri:
        raise SpecError(f"{field}: {uri!r} is an MLflow URI but no tracking server is named and the storage path holds no "
                        "local store (mlflow.db); fix: pass --tracking-uri, set tracking.uri or MLFLOW_TRACKING_URI to the server "
                        "that holds the model, or --storage where the sweep that registered it ran")

    def _list() -> list:
        return list_artifacts(artifact_uri=artifact_location(tracking_uri, uri), tracking_uri=tracking_uri)

    try:
        found = retry_call(f"look up {uri}", tracking_uri, _list)
    except TrackingError as exc:
        cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:300]
        raise SpecError(f"{field}: the tracking server {tracking_uri} could not be reached to look up {uri!r} ({cause}); "
                        "fix: start the server, or point MLFLOW_TRACKING_URI / --tracking-uri at the one that holds the model") from None
    except (MlflowException, OSError, ValueError) as exc:
        said = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SpecError(f"{field}: {uri!r} was not found at the tracking server {tracking_uri} ({type(exc).__name__}: {said}); "
                        "fix: check the name, version or alias in the MLflow UI (a sweep registers its champion as "
                        "models:/REGISTRY_NAME@champion), or register the model first") from None
    if not found:
        raise SpecError(f"{field}: {uri!r} exists at {tracking_uri} but holds no files; fix: point it at a model with a "
                        "diffusers pipeline (e.g. models:/NAME@champion registered by a sweep)")
    return scrub_text(f"MLflow model {uri} at {tracking_uri}")
