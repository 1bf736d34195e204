"""The `evaluation:` section of a sweep spec: which metrics every trial measures, and how.

The metric-name tuples here are the one list of the built-in metrics every part of isosweep uses; a metric added as a
module of evaluation/suite_metrics registers its result names here when it is imported (`register_result_names`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from isosweep.core.names import LS_SPACES
from isosweep.spec.fields import Section as _Section

# The evaluation metrics a spec can ask for, and the values a results row carries ("ls" gives ls, ls_max and,
# with the rbf kernel, ls_rbf; in h, ls_h and ls_h_rbf). Every list of metric names in isosweep is one of these two.
EVAL_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor", "ls")
# Metrics with a bootstrap interval (docs/metrics.md, "Intervals"): <name>_lo and <name>_hi beside <name>.
INTERVAL_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor")  # fid's only at screening fidelity (evaluation.screening)
INTERVAL_BOUNDS = ("lo", "hi")
PPL_QUANTILES = ("ppl_median", "ppl_p90", "ppl_p99")  # of the per-pair values, unfiltered
PPL_COUNT = "ppl_n"  # pairs a sequential PPL (ppl.stop_width) used; absent when it used all num_samples
RESULT_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_rbf", "ls_h", "ls_h_rbf", "ls_max", *PPL_QUANTILES, PPL_COUNT,
                  *(f"{m}_{b}" for m in INTERVAL_METRICS for b in INTERVAL_BOUNDS))
# MCN and VoR at every evaluation.jacobian.timesteps: `mcn`/`vor` at the first, `mcn_t<t>`/`vor_t<t>` at the others
# (with their own _lo/_hi). These names depend on the spec, so they are matched by pattern, not listed.
TIMESTEP_METRICS = ("mcn", "vor")
_TIMESTEP_NAME = re.compile(r"^(mcn|vor)_t(\d+)(_lo|_hi)?$")


def timestep_metric(name: str, t: int) -> str:
    """The result name of MCN or VoR at a timestep other than the first: `mcn_t500`."""
    return f"{name}_t{int(t)}"


# Result names of metrics added beside the built-ins: the evaluation layer registers them when it registers a metric
# (evaluation/suite_metrics), so their values reach records and rows without a list here.
_ADDED_RESULTS: set[str] = set()
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_result_names(*names: str) -> None:
    """Let results rows and records carry these values (and their _lo/_hi): an added metric's names."""
    _ADDED_RESULTS.update(names)
    _ADDED_RESULTS.update(f"{n}_{b}" for n in names for b in INTERVAL_BOUNDS)


def is_result_metric(name: str) -> bool:
    """A value a results row may carry: one of RESULT_METRICS, MCN/VoR at a further timestep (`vor_t100_hi`), or a
    registered added metric's value."""
    return name in RESULT_METRICS or bool(_TIMESTEP_NAME.match(name)) or name in _ADDED_RESULTS


def base_metric(name: str) -> str:
    """The evaluation metric a result value belongs to: `ppl_hi` -> ppl, `vor_t100` -> vor, `ls_rbf` -> ls."""
    m = _TIMESTEP_NAME.match(name)
    if m:
        return m.group(1)
    if name.startswith("ls"):
        return "ls"
    for metric in EVAL_METRICS:
        if name == metric or name.startswith(metric + "_"):
            return metric
    return name


class FidSpec(_Section):
    num_samples: int = Field(10000, ge=2, description="generated images (paper: 10k)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps per sample (paper: 20)")
    reference_samples: int | None = Field(None, ge=2, description="dataset images for reference statistics (default: all)")


class CheckpointFidSpec(_Section):
    every: int | None = Field(0, ge=0, description="cheap FID of the EMA weights every N optimizer steps and at the last; the lowest one's weights are the trial's model; 0 or null: off (the last step is)")
    num_samples: int = Field(1000, ge=2, description="generated images per cheap FID (the same latents at every step)")
    ddim_steps: int = Field(10, ge=1, description="DDIM steps per cheap-FID sample")


class PplSpec(_Section):
    num_samples: int = Field(50000, ge=2, description="slerp pairs (paper: 50k)")
    ddim_steps: int = Field(100, ge=1, description="DDIM steps (paper: 100)")
    eps: float = Field(1e-4, gt=0.0, description="step along the slerp path (method finite_difference)")
    method: Literal["finite_difference", "jvp"] = Field(
        "finite_difference", description="finite_difference: two DDIM decodes eps apart (StyleGAN's); jvp: the eps -> 0 limit from one decode carrying its derivative (forward-mode; docs/metrics.md, 'PPL by forward-mode differentiation')")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="arithmetic of the DDIM decodes: fp32 (TF32 off); tf32 or bf16 only with method jvp (the finite difference is rounding noise in them)")
    stop_width: float | None = Field(None, gt=0.0, le=2.0, description="sequential PPL: stop after a round once the bootstrap interval's width is at most this fraction of PPL (e.g. 0.1); null: always all num_samples pairs")
    round_pairs: int = Field(1000, ge=2, description="with stop_width: pairs per round (over all workers) between two looks at the interval")

    @model_validator(mode="after")
    def _precision_needs_jvp(self) -> "PplSpec":
        if self.precision != "fp32" and self.method != "jvp":
            raise ValueError(f"precision {self.precision!r} needs method 'jvp': a finite difference of two decodes eps "
                             "apart is rounding noise in reduced precision; set method: jvp, or precision: fp32")
        return self


class RtlSpec(_Section):
    num_pairs: int = Field(64, ge=1, description="latent pairs")
    num_points: int = Field(16, ge=2, description="K: intervals on each slerp path (K+1 points)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps along each trajectory")


class EditSpec(_Section):
    """The optional `edit` metric (edit_linearity, edit_straightness, edit_consistency): Local Basis edits of drawn
    samples, measured as `isosweep edit` measures them (docs/editing.md)."""

    num_samples: int = Field(8, ge=2, description="samples edited (latents of evaluation.seed, stream 8); consistency compares their directions")
    t: int = Field(500, ge=0, description="timestep of the edit: the first DDIM step at or below it")
    gamma: float = Field(8.0, gt=0, description="edits x_t + gamma v for gamma evenly over -gamma..gamma (a length in X)")
    columns: int = Field(5, ge=3, description="gammas per direction")
    directions: int = Field(3, ge=1, description="the top Local Basis directions edited, and the subspace compared across samples")
    iterations: int = Field(8, ge=1, description="subspace-iteration rounds for the directions")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps of each edited sample")


class InversionSpec(_Section):
    """The optional `inversion` metric (inversion_mse, inversion_perceptual): dataset images DDIM-inverted to x_T and
    drawn again, measured as `isosweep invert` measures them (docs/editing.md)."""

    num_images: int = Field(8, ge=2, description="dataset images inverted: the first ones of the evaluation dataset (unflipped)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps of the inversion and of the redraw")
    refine: int = Field(0, ge=0, description="fixed-point iterations per inversion step (isosweep invert --refine; 0: plain DDIM inversion)")
    shown: int = Field(4, ge=1, description="images in the inversion_strip picture: originals over their redraws")


class JacobianSpec(_Section):
    num_samples: int = Field(64, ge=2, description="noisy samples x_t per timestep whose encoder Jacobian is decomposed")
    pool: int | None = Field(2, ge=1, description="average-pool kernel on h before the Jacobian; null for none")
    timesteps: list[int] = Field(default_factory=lambda: [999, 500, 100], min_length=1,
                                 description="t at which J_e(x_t) is taken, same x_0 and noise at each: mcn/vor at the first, mcn_t100/vor_t100 etc. at the others (the older timestep: t reads as [t])")
    vor_norm: Literal["global_mean", "paper"] = Field(
        "global_mean", description="VoR's singular values: global_mean: divided by their mean over the evaluation set (scale-free); paper: as Eq. 11 writes them, unnormalised")
    memory_budget_mb: int = Field(2048, ge=64, description="chunk VJPs to stay under this much memory")

    @model_validator(mode="before")
    @classmethod
    def _one_timestep(cls, data: Any) -> Any:
        """`timestep: t` (one t, before timesteps) is read as `timesteps: [t]`; both at once are refused."""
        if isinstance(data, dict) and "timestep" in data:
            if "timesteps" in data:
                raise ValueError("timestep and timesteps both given; keep timesteps (a list of t; timestep is its one-t older form)")
            data = dict(data)
            data["timesteps"] = [data.pop("timestep")]
        return data

    @field_validator("timesteps")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"timesteps must be distinct and >= 0 (got {v})")
        return v


class BootstrapSpec(_Section):
    resamples: int = Field(2000, ge=0, description="bootstrap resamples behind the intervals ppl_lo/ppl_hi, mrtl_lo/_hi, mcn_lo/_hi, vor_lo/_hi (docs/metrics.md); 0: no intervals")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="coverage of the percentile interval [lo, hi]")


class LsSpec(_Section):
    num_samples: int = Field(2000, ge=10, description="generated images labelled by the attribute classifier")
    keep: int = Field(1000, ge=4, description="most confident per attribute kept for the SVM")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps per labelled sample")
    kernels: list[Literal["linear", "rbf"]] = Field(default_factory=lambda: ["linear", "rbf"], description="SVM kernels: linear (LS) and rbf (LS radial)")
    heldout: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of each attribute's kept samples held out: SVM scored on, not fitted on")
    spaces: list[Literal[LS_SPACES]] = Field(default_factory=lambda: ["x_T"], min_length=1, description="x_T: initial latents (paper; ls*); h: bottleneck at the first DDIM step (ls_h*)")


class ScreenFidSpec(_Section):
    num_samples: int = Field(1000, ge=2, description="generated images of the screening FID (at most evaluation.fid.num_samples)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps per screening-FID sample")


class ScreenPplSpec(_Section):
    num_samples: int = Field(2000, ge=2, description="slerp pairs of the screening PPL (at most evaluation.ppl.num_samples)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps per screening-PPL image")


class ScreeningSpec(_Section):
    """Multi-fidelity evaluation (docs/metrics.md, "Screening"): every trial's FID and PPL at these cheap sizes, with
    bootstrap intervals; the full protocol (evaluation.fid, evaluation.ppl) then runs only for the trials that can
    still reach the Pareto front (no other trial beats them beyond the noise on both objectives) and the baseline."""

    fid: ScreenFidSpec = Field(default_factory=ScreenFidSpec)
    ppl: ScreenPplSpec = Field(default_factory=ScreenPplSpec)
    fid_resamples: int = Field(100, ge=20, description="bootstrap resamples of the screening FID's interval (each costs one eigendecomposition of the feature covariance)")


class EvaluationSpec(_Section):
    """What every trial measures at the end, and with which feature networks."""

    metrics: list[str] = Field(
        default_factory=lambda: ["fid", "ppl", "mrtl", "mcn", "vor"],
        description=f"metrics computed per trial: {', '.join(EVAL_METRICS)}; edit_linearity, edit_straightness, edit_consistency "
                    "(Local Basis edits, evaluation.edit; docs/editing.md); inversion_mse, inversion_perceptual (DDIM inversion round trips, "
                    "evaluation.inversion); or one added as a module of evaluation/suite_metrics (docs/metrics.md)"
    )
    backbone: Literal["auto", "standard", "domain"] = Field(
        "auto", description="standard: Inception/LPIPS-AlexNet; domain: the project's shapes network; auto: standard if weights are present"
    )
    weights_dir: str | None = Field(None, description="directory with pre-staged Inception/AlexNet weights (air-gapped clusters)")
    cache_dir: str | None = Field(None, description="where reference statistics and domain networks are cached")
    batch_size: int = Field(64, ge=1, description="images per sampling/feature batch")
    seed: int = Field(1234, ge=0, description="seed for evaluation latents, identical for every trial")
    fid: FidSpec = Field(default_factory=FidSpec)
    checkpoint_fid: CheckpointFidSpec = Field(default_factory=CheckpointFidSpec)
    ppl: PplSpec = Field(default_factory=PplSpec)
    mrtl: RtlSpec = Field(default_factory=RtlSpec)
    jacobian: JacobianSpec = Field(default_factory=JacobianSpec)
    ls: LsSpec = Field(default_factory=LsSpec)
    edit: EditSpec = Field(default_factory=EditSpec)
    inversion: InversionSpec = Field(default_factory=InversionSpec)
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    screening: ScreeningSpec | None = Field(None, description="multi-fidelity evaluation: FID/PPL of every trial at cheap sizes, the full protocol only for trials that can reach the front; null: every trial gets the full protocol")

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, v: list[str]) -> list[str]:
        """Built-in names, or names an added metric may have (the evaluation layer refuses one no module registers).
        An added name is registered as a result name here too, so that a process that reads a sweep back (results,
        status, sync) keeps its values in rows and records without importing the evaluation suite."""
        bad = [m for m in v if m not in EVAL_METRICS and not _METRIC_NAME.match(m)]
        if bad:
            raise ValueError(f"{bad} are not metric names: use any of {', '.join(EVAL_METRICS)} (or an added metric's name: "
                             "lowercase letters, digits and _)")
        register_result_names(*(m for m in v if m not in EVAL_METRICS))
        return v

    @model_validator(mode="after")
    def _screening_is_cheaper(self) -> "EvaluationSpec":
        """Screening sizes at most the full ones, FID and PPL measured, intervals on: checked before anything trains."""
        sc = self.screening
        if sc is None:
            return self
        missing = [m for m in ("fid", "ppl") if m not in self.metrics]
        if missing:
            raise ValueError(f"screening screens FID and PPL but evaluation.metrics lacks {missing}: add them, or set screening: null")
        for metric, cheap, full in (("fid", sc.fid, self.fid), ("ppl", sc.ppl, self.ppl)):
            for field in ("num_samples", "ddim_steps"):
                if getattr(cheap, field) > getattr(full, field):
                    raise ValueError(f"screening.{metric}.{field} = {getattr(cheap, field)} is more than evaluation.{metric}.{field} = "
                                     f"{getattr(full, field)}: a screening must be cheaper than the full protocol; lower it")
        if self.bootstrap.resamples < 100:
            raise ValueError(f"screening decides which trials to evaluate in full from bootstrap intervals, but bootstrap.resamples = "
                             f"{self.bootstrap.resamples}; set it to at least 100 (default 2000)")
        return self

    def screened(self) -> "EvaluationSpec":
        """This evaluation at screening fidelity: FID and PPL at screening's sizes, everything else as it is."""
        if self.screening is None:
            raise ValueError("no evaluation.screening in this spec")
        fid = self.fid.model_copy(update=self.screening.fid.model_dump())
        ppl = self.ppl.model_copy(update=self.screening.ppl.model_dump())
        return self.model_copy(update={"fid": fid, "ppl": ppl})
