"""Evaluation metrics of Isometric Diffusion (docs/math.md section 5) as pure functions.

Each family has its own module: `paths` (slerp, lerp, RTL of a path), `fid`, `ppl`, `rtl` (mRTL),
`jacobian` (singular values of the encoder Jacobian, MCN, VoR) and `separability` (LS). The high-level
functions take a sampler (`isosweep.core.sampling.Sampler`), a feature network or distance, counts and a seed.
"""

from isosweep.evaluation.metrics.fid import feature_statistics, fid_score, frechet_distance, reference_statistics
from isosweep.evaluation.metrics.jacobian import batched_jacobian, jacobian_singular_values, looped_jacobian, mcn, vor
from isosweep.evaluation.metrics.paths import lerp, relative_trajectory_length, slerp
from isosweep.evaluation.metrics.ppl import perceptual_path_length
from isosweep.evaluation.metrics.rtl import mean_rtl
from isosweep.evaluation.metrics.separability import conditional_entropy, linear_separability

__all__ = [
    "slerp",
    "lerp",
    "relative_trajectory_length",
    "frechet_distance",
    "feature_statistics",
    "reference_statistics",
    "fid_score",
    "perceptual_path_length",
    "mean_rtl",
    "jacobian_singular_values",
    "batched_jacobian",
    "looped_jacobian",
    "mcn",
    "vor",
    "linear_separability",
    "conditional_entropy",
]
