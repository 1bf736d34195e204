"""The MLflow model registry, and the commands that use a registered model: pull, sample, interpolate.

What is registered is an MLflow pyfunc model written "from code" (`isosweep/pyfunc_model.py`, which
imports no isosweep) whose single artifact is a diffusers pipeline directory. So anyone with mlflow,
torch and diffusers can use it without isosweep:

    path = mlflow.artifacts.download_artifacts("models:/isodiff-demo@champion", dst_path="champion")
    DDPMPipeline.from_pretrained(f"{path}/artifacts/pipeline")          # PIPELINE_SUBPATH
    mlflow.pyfunc.load_model("models:/isodiff-demo@champion").predict({"n": 4, "seed": 0, "steps": 50})
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from isosweep import images as imgs
from isosweep import tracking

MODEL_NAME = "model"  # the logged model's name inside a run
PIPELINE_KEY = "pipeline"  # the pyfunc artifact key
PIPELINE_SUBPATH = f"artifacts/{PIPELINE_KEY}"  # where the diffusers dir lies in a downloaded model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PIP_REQUIREMENTS = ["mlflow>=3.0", "torch>=2.4", "diffusers>=0.30", "numpy", "pandas"]
MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://")
CHAMPION_ALIAS = "champion"


# --------------------------------------------------------------------------------------- logging and registering


def _stage_pipeline(pipeline_dir: Path, dst: Path) -> Path:
    """Copy the diffusers dir to `dst/pipeline` without training state, so the artifact is named `pipeline`."""
    from isosweep.models import find_diffusers_dir

    src = find_diffusers_dir(Path(pipeline_dir)) or Path(pipeline_dir)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline_dir} holds no diffusers pipeline (model_index.json); pass a DDPMPipeline directory")
    out = dst / PIPELINE_KEY
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(*tracking.CHECKPOINT_EXCLUDE))
    for f in out.rglob("*.json"):  # spec.json keeps the weights self-describing, without credentials
        f.write_text(tracking.scrub_text(f.read_text(errors="replace")))
    return out


def log_pipeline_model(tracking_uri: str, run_id: str, pipeline_dir: str | os.PathLike) -> Any:
    """Log `pipeline_dir` as the run's MLflow 3 LoggedModel `model` (pyfunc from code). Returns ModelInfo."""
    import mlflow
    from mlflow.models import Model

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
    from mlflow.exceptions import MlflowException

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
    clean_tags = {k: tracking.scrub(k, v) for k, v in (tags or {}).items()}
    desc = tracking.scrub_text(description) if description else None
    if mv is None:
        info = log_pipeline_model(tracking_uri, run_id, pipeline_dir)

        def _create() -> Any:
            # the registry resolves a models:/<model_id> source through the fluent tracking URI
            with tracking.use_tracking_uri(tracking_uri):
                return c.create_model_version(registry_name, info.model_uri, run_id=run_id, tags=clean_tags,
                                              description=desc, model_id=info.model_id)

        mv = tracking.retry_call("create model version", tracking_uri, _create)
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
    import mlflow

    local = row.get("checkpoint_path") or ""
    if local and "://" not in local and (Path(local) / "model_index.json").is_file():
        return Path(local)
    c = tracking.client(tracking_uri)
    if tracking.retry_call("list artifacts", tracking_uri, c.list_artifacts, run_id, tracking.CHECKPOINT_ARTIFACT_PATH):
        dst = tmp / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return Path(tracking.retry_call(
            "download checkpoint", tracking_uri, mlflow.artifacts.download_artifacts,
            run_id=run_id, artifact_path=tracking.CHECKPOINT_ARTIFACT_PATH, dst_path=str(dst), tracking_uri=tracking_uri,
        ))
    raise FileNotFoundError(f"run {run_id} has no '{tracking.CHECKPOINT_ARTIFACT_PATH}/' artifacts and no local checkpoint_path ({local!r})")


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


# --------------------------------------------------------------------------------------- resolving and loading


def is_mlflow_uri(text: str) -> bool:
    return str(text).startswith(MLFLOW_PREFIXES)


def resolve_model(model_or_uri: str | os.PathLike, tracking_uri: str | None = None, dst: str | os.PathLike | None = None) -> Path:
    """The local diffusers pipeline dir of a model: a local dir (a pipeline, a pulled model, a
    checkpoint) as is, or a `models:/` / `runs:/` URI downloaded to `dst` (default a temp dir)."""
    from isosweep.models import find_diffusers_dir

    text = str(model_or_uri)
    if is_mlflow_uri(text):
        import mlflow

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        root = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="isosweep-model-"))
        root.mkdir(parents=True, exist_ok=True)

        def _download() -> str:
            # models:/ URIs resolve through the fluent tracking/registry URI, not download_artifacts' arguments
            if not uri:
                return mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(root))
            with tracking.use_tracking_uri(uri):
                return mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(root), tracking_uri=uri)

        got = tracking.retry_call(f"download {text}", uri or mlflow.get_tracking_uri(), _download)
        base = Path(got)
    else:
        base = Path(text).expanduser()
        if not base.exists():
            raise FileNotFoundError(f"{text}: no such directory, and not an MLflow URI (models:/NAME@alias, runs:/ID/model)")
    preferred = base / PIPELINE_SUBPATH
    if (preferred / "model_index.json").is_file():
        return preferred
    found = find_diffusers_dir(base)
    if found is None:
        raise FileNotFoundError(f"{text} (at {base}) holds no diffusers directory (model_index.json or unet/config.json)")
    return found


def load_pipeline(path: str | os.PathLike) -> tuple[Any, Any]:
    """(unet, scheduler) of a diffusers pipeline dir (or a bare UNet dir with a default DDPM scheduler)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    path = Path(path)
    if (path / "model_index.json").is_file():
        pipe = DDPMPipeline.from_pretrained(path)
        return pipe.unet, pipe.scheduler
    return UNet2DModel.from_pretrained(path), DDPMScheduler()


def _sample_shape(unet: Any) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def _ddim(unet: Any, scheduler: Any, x_T: Any, steps: int) -> np.ndarray:
    """DDIM (eta = 0) from x_T (B, C, H, W): images (B, C, H, W) in [-1, 1] as numpy."""
    from isosweep.sampling import ddim_sample

    out = ddim_sample(unet, scheduler, x_T, steps, batch_size=16, progress=False)
    return out.images.numpy()


def _noise(seed: int, shape: tuple[int, int, int], n: int = 1) -> Any:
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g)


# --------------------------------------------------------------------------------------- commands


def pull_command(args: argparse.Namespace) -> int:
    """`isosweep pull MODEL_URI --out DIR`: download, load with DDPMPipeline, 1-step sample, print the path."""
    import torch

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")
    if is_mlflow_uri(args.model_uri):
        pipe_dir = resolve_model(args.model_uri, args.tracking_uri, dst=out)
    else:
        shutil.copytree(resolve_model(args.model_uri), out / PIPELINE_SUBPATH, dirs_exist_ok=True)
        pipe_dir = out / PIPELINE_SUBPATH
    unet, scheduler = load_pipeline(pipe_dir)
    x = _noise(0, _sample_shape(unet))
    img = _ddim(unet, scheduler, x, 1)
    if not np.isfinite(img).all():
        raise RuntimeError(f"{args.model_uri}: a 1-step sample is not finite; the model is broken")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"pulled {args.model_uri} -> {out}")
    print(f"diffusers pipeline: {pipe_dir}  (DDPMPipeline.from_pretrained loads it; UNet {n_params / 1e6:.2f}M params, "
          f"{'x'.join(map(str, _sample_shape(unet)))} images)")
    return 0


def sample_grid_image(model: str, n: int, steps: int, seed: int, tracking_uri: str | None = None) -> Any:
    """A PIL grid of n DDIM samples of a model dir or URI (seed -> the latents (n, C, H, W))."""
    unet, scheduler = load_pipeline(resolve_model(model, tracking_uri))
    x = _noise(seed, _sample_shape(unet), n)
    return imgs.make_grid(imgs.to_uint8(_ddim(unet, scheduler, x, steps)))


def sample_command(args: argparse.Namespace) -> int:
    """`isosweep sample MODEL --n 16 --steps 50 --seed 0 --out grid.png`."""
    if args.n < 1 or args.steps < 1:
        raise ValueError("--n and --steps must be at least 1")
    path = imgs.save_png(sample_grid_image(args.model, args.n, args.steps, args.seed, args.tracking_uri), args.out)
    print(f"wrote {path} ({args.n} samples, DDIM {args.steps} steps, seed {args.seed})")
    return 0


def interpolation_frames(unet: Any, scheduler: Any, seeds: Sequence[int], frames: int, mode: str, steps: int) -> np.ndarray:
    """Images (frames, C, H, W) in [-1, 1] along the slerp/lerp path between two seeds' latents."""
    import torch

    from isosweep.metrics import lerp, slerp

    shape = _sample_shape(unet)
    a, b = _noise(seeds[0], shape), _noise(seeds[1], shape)
    s = torch.linspace(0.0, 1.0, frames)
    fn = slerp if mode == "slerp" else lerp
    x = fn(a.expand(frames, *shape), b.expand(frames, *shape), s)
    return _ddim(unet, scheduler, x, steps)


def frame_distances(frames: np.ndarray) -> np.ndarray:
    """Pixel L2 distance between adjacent frames: (F, C, H, W) in [-1, 1] -> (F-1,), RMS per pixel."""
    d = frames[1:].astype(np.float64) - frames[:-1].astype(np.float64)
    return np.sqrt((d.reshape(len(d), -1) ** 2).mean(axis=1))


def distance_plot(dists: np.ndarray, out: str | os.PathLike, title: str) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.4), dpi=100)
    ax.plot(range(1, len(dists) + 1), dists, "-o", ms=3)
    ax.set_xlabel("adjacent frame pair (i, i+1)")
    ax.set_ylabel("pixel L2 (RMS, [-1, 1] scale)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def interpolate_command(args: argparse.Namespace) -> int:
    """`isosweep interpolate MODEL --seeds 1 2 --frames 9 --mode slerp --steps 50 --out strip.png`.

    Writes the strip and, next to it, `<out stem>_distances.png` (adjacent-frame pixel L2, paper
    Fig. 6) and `<out stem>_distances.json`.
    """
    if args.frames < 2 or args.steps < 1:
        raise ValueError("--frames must be at least 2 and --steps at least 1")
    unet, scheduler = load_pipeline(resolve_model(args.model, args.tracking_uri))
    frames = interpolation_frames(unet, scheduler, args.seeds, args.frames, args.mode, args.steps)
    out = imgs.save_png(imgs.make_strip(imgs.to_uint8(frames)), args.out)
    dists = frame_distances(frames)
    plot = distance_plot(dists, out.with_name(out.stem + "_distances.png"),
                         f"{args.mode} seeds {args.seeds[0]}->{args.seeds[1]}, DDIM {args.steps} steps")
    out.with_name(out.stem + "_distances.json").write_text(json.dumps(
        {"mode": args.mode, "seeds": list(args.seeds), "steps": args.steps, "distance": "pixel_l2_rms", "values": dists.tolist()}
    ))
    print(f"wrote {out} ({args.frames} frames, {args.mode}) and {plot} (pixel L2 between adjacent frames)")
    return 0
