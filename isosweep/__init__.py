"""isosweep: Ray sweeps for Isometric Diffusion fine-tuning, tracked in MLflow."""

__version__ = "0.1.0"
