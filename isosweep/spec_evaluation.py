"""The `evaluation:` section of a sweep spec: which metrics every trial measures, and how.

Split from `config` (which re-exports every name here) to keep one module per concern and each under
the size limit; the metric-name tuples are the one list every part of isosweep uses.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from isosweep.core.names import LS_SPACES
from isosweep.spec_base import Section as _Section

# The evaluation metrics a spec can ask for, and the values a results row carries ("ls" gives ls, ls_max and,
# with the rbf kernel, ls_rbf; in h, ls_h and ls_h_rbf). Every list of metric names in isosweep is one of these two.
EVAL_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor", "ls")
# Metrics with a bootstrap interval (docs/metrics.md, "Intervals"): <name>_lo and <name>_hi beside <name>.
INTERVAL_METRICS = ("ppl", "mrtl", "mcn", "vor")
INTERVAL_BOUNDS = ("lo", "hi")
PPL_QUANTILES = ("ppl_median", "ppl_p90", "ppl_p99")  # of the per-pair values, unfiltered
RESULT_METRICS = ("fid", "ppl", "mrtl", "mcn", "vor", "ls", "ls_rbf", "ls_h", "ls_h_rbf", "ls_max", *PPL_QUANTILES,
                  *(f"{m}_{b}" for m in INTERVAL_METRICS for b in INTERVAL_BOUNDS))
# MCN and VoR at every evaluation.jacobian.timesteps: `mcn`/`vor` at the first, `mcn_t<t>`/`vor_t<t>` at the others
# (with their own _lo/_hi). These names depend on the spec, so they are matched by pattern, not listed.
TIMESTEP_METRICS = ("mcn", "vor")
_TIMESTEP_NAME = re.compile(r"^(mcn|vor)_t(\d+)(_lo|_hi)?$")


def timestep_metric(name: str, t: int) -> str:
    """The result name of MCN or VoR at a timestep other than the first: `mcn_t500`."""
    return f"{name}_t{int(t)}"


def is_result_metric(name: str) -> bool:
    """A value a results row may carry: one of RESULT_METRICS, or MCN/VoR at a further timestep (`vor_t100_hi`)."""
    return name in RESULT_METRICS or bool(_TIMESTEP_NAME.match(name))


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
    eps: float = Field(1e-4, gt=0.0, description="step along the slerp path")


class RtlSpec(_Section):
    num_pairs: int = Field(64, ge=1, description="latent pairs")
    num_points: int = Field(16, ge=2, description="K: intervals on each slerp path (K+1 points)")
    ddim_steps: int = Field(20, ge=1, description="DDIM steps along each trajectory")


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


class EvaluationSpec(_Section):
    """What every trial measures at the end, and with which feature networks."""

    metrics: list[Literal[EVAL_METRICS]] = Field(
        default_factory=lambda: ["fid", "ppl", "mrtl", "mcn", "vor"], description="metrics computed per trial"
    )
    backbone: Literal["auto", "standard", "domain"] = Field(
        "auto", description="standard: Inception/LPIPS-AlexNet; domain: the project's shapes network; auto: standard if weights are present"
    )
    weights_dir: str | None = Field(None, description="directory with pre-staged Inception/AlexNet weights (air-gapped clusters)")
    cache_dir: str | None = Field(None, description="where reference statistics and domain networks are cached")
    batch_size: int = Field(64, ge=1, description="images per sampling/feature batch")
    seed: int = Field(1234, description="seed for evaluation latents, identical for every trial")
    fid: FidSpec = Field(default_factory=FidSpec)
    checkpoint_fid: CheckpointFidSpec = Field(default_factory=CheckpointFidSpec)
    ppl: PplSpec = Field(default_factory=PplSpec)
    mrtl: RtlSpec = Field(default_factory=RtlSpec)
    jacobian: JacobianSpec = Field(default_factory=JacobianSpec)
    ls: LsSpec = Field(default_factory=LsSpec)
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
