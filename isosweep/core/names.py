"""Names of the paper's choices that the spec validates against, kept free of torch so that loading a spec
(and `isosweep --help`) does not import it."""

from __future__ import annotations

ISO_METRICS = ("stereographic", "identity", "ambient")  # the metric G on the noise space (train.iso_metric)
REDUCTIONS = ("local", "global")  # the isometry ratio per worker, or over all-reduced means (train.iso_reduction)
ISO_TIMESTEPS = ("per_timestep", "pooled")  # the isometry ratio at one t per micro-batch (Eq. 6), or over mixed t (train.iso_timesteps)
LS_SPACES = ("x_T", "h")  # where LS fits its SVM: the initial latents (the paper), or the UNet bottleneck (evaluation.ls.spaces)
# Checkpoint selection (evaluation.checkpoint_fid): the step metric, then the final report's and the row's columns
CHEAP_FID = "fid_cheap"  # the cheap FID of the EMA weights at a step (lower is better; its backbone: backbone_fid_cheap)
SELECTED_STEP, SELECTED_FID = "selected_step", "selected_fid_cheap"  # the step whose weights are the trial's model, its cheap FID
