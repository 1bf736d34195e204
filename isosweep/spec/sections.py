"""The spec's schema: every section but `evaluation:` (`evaluation.py`) and the root `SweepSpec`, with what a trial varies
and the baseline's parameters.

Every section is a pydantic model with unknown keys forbidden, so a misspelt key fails at load time
with the file, the field, the bad value and the fix in one message (`SpecError`). The same schema is
used by `isosweep validate`, `run`, `train` and `eval`; the resolved spec is saved with every trial.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from isosweep.core.names import ISO_METRICS, ISO_TIMESTEPS
from isosweep.spec.evaluation import EVAL_METRICS, EvaluationSpec
from isosweep.spec.fields import SAFE_NAME_PATTERN
from isosweep.spec.fields import Section as _Section

# What a trial varies: written into `train` by `resolve_trial_spec`, searched by Tune, one column each.
TRIAL_KEYS = ("lambda_iso", "p", "iso_metric")
# What one point of `search.points` may also set (else `train`'s value): the ablation of the loss's timestep
# handling and repeats over training seeds, in one sweep with one baseline (search_spaces/shapes_study_ablations.yaml).
POINT_KEYS = ("iso_timesteps", "seed")
# The baseline trial every sweep runs first (lambda_iso = 0: no isometry loss anywhere).
BASELINE_PARAMS = {"lambda_iso": 0.0, "p": 1.0, "iso_metric": "stereographic", "baseline": True}
# Fields renamed since earlier versions: old key -> new key, refused with a message naming the new one.
RENAMED_FIELDS = {("train", "metric"): "iso_metric", ("search", "metric"): "iso_metric"}
# Fields added since earlier versions whose default is not what those versions did: a spec saved before
# the field existed ran with this value (read by `changes.spec_for_resume`, so a resumed sweep keeps it).
ADDED_FIELDS = {("train", "iso_timesteps"): "pooled",
                ("evaluation", "bootstrap"): {"resamples": 0, "level": 0.95}}  # no intervals: its rows compare by value


class BaseModelSpec(_Section):
    """Where the pretrained UNet comes from.

    `source` is one of: `builtin:shapes` (trained by `isosweep pretrain` and cached), a local diffusers
    directory, a hub id such as `google/ddpm-ema-celebahq-256` (loaded from the local HF cache when
    offline), or an MLflow model URI (`models:/NAME@alias`, `runs:/ID/model`; docs/tracking.md, staged sweeps).
    """

    source: str = Field("builtin:shapes", description="builtin:shapes, a diffusers directory, a hub id, or an MLflow model URI "
                                                      "(models:/NAME@champion: an earlier sweep's champion; models:/NAME/3 pins a version)")
    subfolder: str | None = Field(None, description="subfolder of the source holding the UNet, e.g. 'unet' for a pipeline")
    pretrain_steps: int = Field(600, ge=1, description="optimizer steps for builtin:shapes pretraining")
    pretrain_batch_size: int = Field(32, ge=1, description="batch size for builtin:shapes pretraining")
    cache_dir: str | None = Field(None, description="where builtin models are cached (default ~/.cache/isosweep/models)")

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if v.startswith("builtin:") and v != "builtin:shapes":  # any other builtin: would be looked up as a hub id
            raise ValueError(f"unknown built-in model {v!r}; the only one is builtin:shapes")
        return v


class DatasetSpec(_Section):
    """The training images: the built-in `shapes` problem or an image folder (CelebA-HQ/LSUN layout)."""

    kind: Literal["shapes", "image_folder"] = Field("shapes", description="shapes (built in, labelled) or image_folder")
    path: str | None = Field(None, description="root of the image tree (image_folder only)")
    resolution: int = Field(32, ge=8, description="side length in pixels after resize and center crop")
    size: int = Field(4096, ge=1, description="number of images for shapes (ignored for image_folder)")
    seed: int = Field(0, ge=0, description="seed that generates shapes")
    center_crop: bool = Field(True, description="center crop to a square before resizing")
    random_flip: bool = Field(True, description="random horizontal flip during training")
    attributes: str | None = Field(None, description="CSV of per-image attribute labels for LS (image_folder only)")

    @model_validator(mode="after")
    def _path_for_folder(self) -> "DatasetSpec":
        if self.kind == "image_folder" and not self.path:
            raise ValueError("dataset.kind is image_folder but dataset.path is empty; set dataset.path to the image root")
        return self


class TrainSpec(_Section):
    """One trial's fine-tuning: L = L_dsm + lambda_iso * 1[t >= pT] * L_iso (docs/math.md sections 3-4)."""

    lambda_iso: float = Field(1e-4, ge=0.0, description="weight of the isometry loss; 0 is the baseline")
    p: float = Field(0.5, ge=0.0, le=1.0, description="fraction of the schedule (low-noise end) without the isometry loss; 1 is the baseline")
    iso_metric: Literal[ISO_METRICS] = Field("stereographic", description="the metric G on the noise space of the isometry loss (docs/math.md section 2)")
    iso_reduction: Literal["global", "local"] = Field("global", description="global: ratio of all-reduced means (faithful); local: per-worker ratio")
    iso_timesteps: Literal[ISO_TIMESTEPS] = Field(
        "per_timestep", description="per_timestep: every iso micro-batch shares one t, the ratio is Eq. 6 at that t (the paper); "
                                    "pooled: one ratio over samples with their own t (the public code; an ablation)")
    iso_batch: int | None = Field(
        None, ge=1, description="samples of each worker's micro-batch (the first ones) the isometry term uses; null = all. "
                                "Its cost scales with it; the denoising term always uses the whole micro-batch")
    iso_shared_forward: bool = Field(
        False, description="denoise the iso sub-batch from the isometry term's encoder pass (one encoder pass instead of two); "
                           "with per_timestep those samples are denoised at t_iso (still uniform on [pT, T): L_dsm stays unbiased)")
    iso_every: int = Field(
        1, ge=1, description="lazy regularisation: the isometry term only on optimizer steps whose index is a multiple of n, "
                             "weighted lambda_iso x n (the same expected gradient at 1/n of its cost per step); 1 = every step (the paper)")
    learning_rate: float = Field(1e-4, gt=0.0, description="Adam learning rate")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2")
    adam_eps: float = Field(1e-8, gt=0.0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (0 = plain Adam)")
    global_batch_size: int = Field(32, ge=1, description="images per optimizer step over all workers and accumulation steps")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step on each worker")
    epochs: float = Field(10, gt=0, description="passes over the dataset (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0, description="EMA decay per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast dtype on GPU; forced to 'no' on CPU")
    grad_clip: float | None = Field(1.0, gt=0.0, description="max gradient norm; null disables clipping")
    seed: int = Field(0, ge=0, description="seed for data order, timesteps, noise and probes")
    report_every: int = Field(1, ge=1, description="report metrics to Ray every k optimizer steps")
    checkpoint_every: int = Field(200, ge=1, description="checkpoint every N optimizer steps (and at the end)")
    timesteps: int = Field(1000, ge=2, description="T of the DDPM schedule (must match the model's scheduler)")

    def per_worker_batch_size(self, num_workers: int) -> int:
        """Images per micro-batch on one worker; global batch must divide evenly."""
        denom = num_workers * self.grad_accumulation
        if self.global_batch_size % denom:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"workers_per_trial*grad_accumulation={denom}; choose a multiple of {denom}"
            )
        return self.global_batch_size // denom


class Distribution(_Section):
    """A search dimension: `loguniform`/`uniform` (low, high), or `choice` (values)."""

    type: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "Distribution":
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} distribution needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low={self.low} is above high={self.high}; swap them")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low}); the baseline lambda_iso=0 is always added on its own")
        return self

    def bounds(self) -> list[float]:
        """All the values this dimension can take at its edges (for range checks)."""
        if self.type == "choice":
            return [v for v in self.values if isinstance(v, (int, float))]
        return [self.low, self.high]


class TrialPoint(_Section):
    """One trial of `search.algorithm: points`: its lambda_iso, p and G, and optionally its own loss timestep
    handling and training seed (`train`'s when left out)."""

    lambda_iso: float = Field(..., ge=0, allow_inf_nan=False, description="weight of the isometry loss (0: a repeat of the baseline's training)")
    p: float = Field(..., ge=0, le=1, allow_inf_nan=False, description="the schedule's fraction of timesteps")
    iso_metric: Literal[ISO_METRICS] = Field(..., description="G: " + ", ".join(ISO_METRICS))
    iso_timesteps: Literal[ISO_TIMESTEPS] | None = Field(None, description="per_timestep or pooled; default train.iso_timesteps")
    seed: int | None = Field(None, ge=0, description="training seed; default train.seed")

    def as_config(self) -> dict[str, Any]:
        """The Tune config of the point: every TRIAL_KEYS value, the POINT_KEYS it sets, baseline False."""
        out = {k: getattr(self, k) for k in TRIAL_KEYS}
        out.update({k: getattr(self, k) for k in POINT_KEYS if getattr(self, k) is not None})
        return {**out, "baseline": False}


class SearchSpec(_Section):
    """The Ray Tune search over lambda_iso, p and G."""

    algorithm: Literal["optuna", "random", "grid", "points"] = Field(
        "optuna", description="optuna (multi-objective TPE), random, grid, or points (exactly the trials in search.points)")
    points: list[TrialPoint] = Field(
        default_factory=list, description="for algorithm=points: the trials to run after the baseline, each "
        "{lambda_iso, p, iso_metric} and optionally iso_timesteps and seed")
    num_trials: int = Field(8, ge=1, description="searched trials (the baseline trial is added on top); for grid, passes over the whole grid")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster's resources fit")
    lambda_iso: Distribution = Field(
        default_factory=lambda: Distribution(type="loguniform", low=1e-5, high=1e-3),
        description="{type: loguniform|uniform, low, high} or {type: choice, values: [...]}, all >= 0",
    )
    p: Distribution = Field(
        default_factory=lambda: Distribution(type="choice", values=[0.0, 0.5]),
        description="{type: uniform, low, high} or {type: choice, values}, inside [0, 1]",
    )
    iso_metric: Distribution = Field(
        default_factory=lambda: Distribution(type="choice", values=["stereographic", "identity"]),
        description="{type: choice, values} of stereographic, identity, ambient",
    )
    scheduler: Literal["none"] = Field(
        "none", description="early stopping: none (FID and PPL exist only after evaluation; never prune on the denoising loss)"
    )
    seed: int = Field(0, ge=0, description="seed of the search algorithm")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial (Tune) and of its workers (Train)")

    @field_validator("lambda_iso", "p")
    @classmethod
    def _numbers_in_range(cls, d: Distribution, info: ValidationInfo) -> Distribution:
        name = info.field_name
        for v in d.values or []:  # a choice's values are Any to YAML: check each is a finite number (not "1.5", null, true)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"search.{name} has the value {v!r}, which is not a finite number; fix: give numbers "
                                 "only, without quotes, null, inf or nan, e.g. values: [0.0, 0.5]")
        for v in d.bounds():
            if name == "lambda_iso" and v < 0:
                raise ValueError(f"search.lambda_iso can reach {v} < 0; lambda_iso must be >= 0")
            if name == "p" and not 0.0 <= v <= 1.0:
                raise ValueError(f"search.p can reach {v}; p must lie in [0, 1]")
        return d

    @field_validator("iso_metric")
    @classmethod
    def _known_metrics(cls, d: Distribution) -> Distribution:
        if d.type != "choice":
            raise ValueError("search.iso_metric must be a choice of " + ", ".join(ISO_METRICS))
        bad = [m for m in d.values if not isinstance(m, str) or m not in ISO_METRICS]
        if bad:
            raise ValueError(f"search.iso_metric has unknown value(s) {bad}; use any of {list(ISO_METRICS)}")
        return d

    @model_validator(mode="after")
    def _grid(self) -> "SearchSpec":
        if self.algorithm == "points" and not self.points:
            raise ValueError("search.algorithm is points but search.points is empty; fix: list the trials, e.g. "
                             "points: [{lambda_iso: 1.0e-3, p: 0.5, iso_metric: stereographic}]")
        if self.points and self.algorithm != "points":
            raise ValueError(f"search.points is given but search.algorithm is {self.algorithm}, which would ignore it; "
                             "fix: set algorithm: points, or remove points")
        seen = set()
        for i, point in enumerate(self.points):
            key = tuple(sorted(point.as_config().items()))
            if key in seen:
                raise ValueError(f"search.points[{i}] repeats an earlier point ({point.as_config()}); fix: remove it, "
                                 "or give it another seed to repeat a configuration")
            seen.add(key)
        if self.algorithm == "grid":
            for name in TRIAL_KEYS:
                if getattr(self, name).type != "choice":
                    raise ValueError(f"grid search needs search.{name} to be a choice (a list of values)")
        return self


class SelectionSpec(_Section):
    """How the champion is chosen from the (FID, PPL) Pareto front."""

    objectives: list[str] = Field(default_factory=lambda: ["fid", "ppl"], description="both minimised")
    rule: Literal["fid_tolerance", "knee", "weighted"] = Field(
        "fid_tolerance", description="fid_tolerance: lowest PPL among trials with FID <= baseline*(1+tol) and a PPL interval wholly below the baseline's, else the baseline (docs/metrics.md); knee; weighted"
    )
    fid_tolerance: float = Field(0.10, ge=0.0, description="relative FID increase over the baseline allowed (0.10 = 10%)")
    weights: dict[str, float] = Field(default_factory=lambda: {"fid": 1.0, "ppl": 1.0}, description="for rule=weighted, on normalised objectives")

    @field_validator("objectives")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in EVAL_METRICS]
        if bad or len(v) != 2:
            raise ValueError(f"selection.objectives must be two of {list(EVAL_METRICS)} (got {v})")
        return v


class ResourcesSpec(_Section):
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per trial")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL backend")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (1 when use_gpu and left at 0)")

    @model_validator(mode="after")
    def _gpu(self) -> "ResourcesSpec":
        if self.use_gpu and self.gpus_per_worker == 0:
            self.__dict__["gpus_per_worker"] = 1.0
        return self


class TrackingSpec(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite under the storage path")
    experiment: str | None = Field(None, description="MLflow experiment (default: the spec name)")
    registry_name: str | None = Field(None, description="registered model name (default: isodiff-<name>)")
    register_champion: bool = Field(True, description="register the champion with alias 'champion'")


class StorageSpec(_Section):
    path: str = Field("runs", description="local directory or s3://bucket/prefix for Ray Tune results and checkpoints")


class SweepSpec(_Section):
    """A whole sweep: the root of the YAML file."""

    name: str = Field(..., pattern=SAFE_NAME_PATTERN, max_length=100,
                      description="sweep name (a folder name: letters, digits, _ . -, not starting with . or -); also the MLflow experiment by default")
    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        per_worker = self.train.per_worker_batch_size(self.resources.workers_per_trial)
        iso_batch = self.train.iso_batch
        if iso_batch is not None and iso_batch > per_worker:
            raise ValueError(f"train.iso_batch={iso_batch} is above the per-worker micro-batch ({per_worker} = global_batch_size / "
                             f"(workers_per_trial x grad_accumulation)); fix: set train.iso_batch to at most {per_worker}, or null for all")
        if self.train.iso_shared_forward and self.resources.workers_per_trial > 1 and (iso_batch or per_worker) >= per_worker:
            raise ValueError(f"train.iso_shared_forward under DDP (workers_per_trial={self.resources.workers_per_trial}) needs "
                             f"train.iso_batch below the per-worker micro-batch ({per_worker}), so that the other samples' forward "
                             f"runs through the DDP wrapper; fix: set train.iso_batch to at most {per_worker - 1}")
        max_steps = self.train.max_steps
        if self.train.iso_every > 1 and max_steps is not None and self.train.iso_every > max_steps:
            raise ValueError(f"train.iso_every={self.train.iso_every} is above train.max_steps={max_steps}: the isometry term would be "
                             f"taken once, at step 0, weighted {self.train.iso_every}x; fix: set train.iso_every to at most {max_steps} "
                             "(or 1, every step)")
        unmeasured = [o for o in self.selection.objectives if o not in self.evaluation.metrics]
        if unmeasured:  # found now, not after every trial has trained
            raise ValueError(f"selection.objectives {unmeasured} are not in evaluation.metrics {self.evaluation.metrics}; "
                             "add them to evaluation.metrics or choose other objectives")
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registry_name(self) -> str:
        return self.tracking.registry_name or f"isodiff-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
