"""The frozen autoencoder of a latent diffusion model: images in [-1, 1] to the UNet's latents and back.

A latent model (diffusers' `LDMPipeline`: `unet` works on the latents of `vqvae`) trains and samples in latent
space: X is the latent space, H the latent UNet's bottleneck. `Codec` wraps its autoencoder (`VQModel`, or an
`AutoencoderKL` a user brings) with diffusers' scaling: `encode` multiplies by `scaling_factor`, `decode` divides by
it first, as `LDMPipeline` does. A `VQModel` encodes to its pre-quantisation latents (what CompVis' LDM trains on) and
quantises when decoding; an `AutoencoderKL` encodes to the mean of its posterior (deterministic, so a training step
draws no extra random numbers). The autoencoder never trains: its parameters do not require gradients, it stays in
eval mode, and both directions run without autograd. A pixel-space model has no codec (`None`).
"""

from __future__ import annotations

import torch

__all__ = ["CODEC_CLASSES", "Codec"]

# the autoencoder classes a latent pipeline may name (model_index.json), loaded from diffusers by this name only
CODEC_CLASSES = ("VQModel", "AutoencoderKL")


class Codec:
    """`encode(images) -> latents`, `decode(latents) -> images` through a frozen diffusers autoencoder.

    `module` is the autoencoder (None: the identity map, a latent space equal to pixel space, scaling 1);
    `name` is the pipeline component it is saved as (`vqvae` in `LDMPipeline`'s layout)."""

    def __init__(self, module: torch.nn.Module | None, name: str = "vqvae", *, batch_size: int = 16) -> None:
        self.module, self.name, self.batch_size = module, name, batch_size
        if module is not None:
            module.requires_grad_(False).eval()

    @classmethod
    def identity(cls) -> Codec:
        """The identity autoencoder: the latent path then computes exactly what the pixel path computes."""
        return cls(None)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.module is None else float(self.module.config.get("scaling_factor", 1.0))

    def to(self, device: torch.device | str) -> Codec:
        if self.module is not None:
            self.module.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] to scaled latents (B, C, h, w), in chunks of `batch_size`."""
        if self.module is None:
            return images
        return torch.cat([self._encode(chunk) for chunk in images.split(self.batch_size)]) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, straight_through: bool = False) -> torch.Tensor:
        """Scaled latents to images in [-1, 1] (clamped), on the latents' device.

        `straight_through` (for forward-mode differentiation, `torch.func.jvp`): a `VQModel` quantises the primal
        latents only and passes their tangent through the quantiser unchanged (its own straight-through estimator),
        since the codebook lookup has no forward-mode rule; the images are the same."""
        if self.module is None:
            return latents
        device = next(self.module.parameters()).device
        out = [self._decode(chunk.to(device) / self.scaling_factor, straight_through).sample.clamp(-1, 1).to(latents.device)
               for chunk in latents.split(self.batch_size)]
        return torch.cat(out)

    def _decode(self, z: torch.Tensor, straight_through: bool):
        if not (straight_through and hasattr(self.module, "quantize")):
            return self.module.decode(z)
        quantised = self.module.quantize(z.detach())[0]
        return self.module.decode(z + (quantised - z.detach()), force_not_quantize=True)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.module.parameters()).device
        out = self.module.encode(images.to(device=device, dtype=torch.float32))
        latents = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return latents.to(images.device)
