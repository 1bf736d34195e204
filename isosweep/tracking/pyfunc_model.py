"""MLflow "model from code": a pyfunc that samples images from a diffusers DDPM pipeline directory.

This file is logged as the model's code (``python_model=<this file's path>``), so a registered model
loads with mlflow, torch and diffusers only: it must never import isosweep.

The model's artifacts hold one diffusers pipeline directory under the key ``pipeline``. After
``mlflow.artifacts.download_artifacts("models:/NAME@champion", dst_path=D)`` that directory is
``D/artifacts/pipeline`` and ``diffusers.DDPMPipeline.from_pretrained(D / "artifacts" / "pipeline")``
loads it without MLflow at all.

``predict`` input: a dict or a one-row DataFrame with ``n`` (images, default 4), ``seed`` (default 0)
and ``steps`` (DDIM steps, eta = 0, default 50). Output: a uint8 array of shape (n, H, W, C).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


def _first(value: Any) -> Any:
    """A scalar from a DataFrame column, a list, or a plain value."""
    if hasattr(value, "iloc"):
        return value.iloc[0]
    if isinstance(value, (list, tuple, np.ndarray)):
        return value[0]
    return value


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """Samples with DDIM (eta = 0) from the UNet and scheduler config of a DDPM pipeline directory."""

    def load_context(self, context: Any) -> None:
        from diffusers import DDPMPipeline

        self.pipeline_dir = context.artifacts["pipeline"]
        self.pipe = DDPMPipeline.from_pretrained(self.pipeline_dir)

    # no type hints here: MLflow would try to infer a schema from them
    def predict(self, context, model_input, params=None):
        import torch
        from diffusers import DDIMPipeline, DDIMScheduler

        if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):
            model_input = {k: model_input[k] for k in model_input.columns}
        model_input = dict(model_input or {})
        n = int(_first(model_input.get("n", 4)))
        seed = int(_first(model_input.get("seed", 0)))
        steps = int(_first(model_input.get("steps", 50)))
        ddim = DDIMPipeline(unet=self.pipe.unet, scheduler=DDIMScheduler.from_config(self.pipe.scheduler.config))
        ddim.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        out = ddim(batch_size=n, generator=generator, num_inference_steps=steps, eta=0.0, output_type="np")
        images = np.asarray(out.images)  # (n, H, W, C) in [0, 1]
        return (images * 255).round().clip(0, 255).astype(np.uint8)


mlflow.models.set_model(DiffusersPipelineModel())
