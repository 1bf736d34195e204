"""Evaluation metrics of Isometric Diffusion (docs/math.md section 5) as pure functions.

Each family has its own module: `paths` (slerp, lerp, RTL of a path), `fid`, `ppl`, `rtl` (mRTL),
`jacobian` (singular values of the encoder Jacobian, MCN, VoR) and `separability` (LS). The sampled ones take a
`SampleRange` (`samples`: the sampler, latents' seed, DDIM steps, range and batches) and a feature network,
distance or classifier.
"""

from isosweep.evaluation.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    generated_features,
    reference_statistics,
)
from isosweep.evaluation.metrics.jacobian import batched_jacobian, jacobian_singular_values, looped_jacobian, mcn, vor
from isosweep.evaluation.metrics.paths import lerp, relative_trajectory_length, slerp
from isosweep.evaluation.metrics.ppl import perceptual_path_length, ppl_distances
from isosweep.evaluation.metrics.rtl import rtl_per_pair, summarize_rtl
from isosweep.evaluation.metrics.samples import SampleRange
from isosweep.evaluation.metrics.separability import classify_samples, conditional_entropy, linear_separability

__all__ = [
    "SampleRange",
    "slerp",
    "lerp",
    "relative_trajectory_length",
    "frechet_distance",
    "feature_statistics",
    "reference_statistics",
    "generated_features",
    "fid_from_features",
    "ppl_distances",
    "perceptual_path_length",
    "rtl_per_pair",
    "summarize_rtl",
    "jacobian_singular_values",
    "batched_jacobian",
    "looped_jacobian",
    "mcn",
    "vor",
    "linear_separability",
    "conditional_entropy",
    "classify_samples",
]
