"""The semantic space H of a diffusers UNet2DModel: its bottleneck, and how to reach it cheaply.

The encoder e_t(x) = h is everything `UNet2DModel.forward` runs before and including `mid_block`
(time embedding, conv_in, down blocks, mid block; docs/math.md section 1). `encode` runs only that;
`encode_with_skips` also returns what the up blocks need, so `decode` can finish the UNet from one
shared encoder pass. Both replicate diffusers 0.42's `UNet2DModel.forward` step by step
(center_input_sample, class conditioning, skip down/up blocks, the Fourier time scaling).

Autodiff: forward-mode AD (torch.func.jvp) is not implemented for the flash kernels behind
F.scaled_dot_product_attention, which also have no double backward; and on some torch builds
GroupNorm's forward-mode rule rejects the non-contiguous tangents that attention blocks produce.
`autodiff_safe(unet)` handles both for the duration of a `with` block and restores everything on
exit, so the denoising forward keeps the fast kernels. `encoder_at(unet, t)` wraps all of it into
the callable x -> h that `isosweep.core.geometry.isometry_terms` expects.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class UNetEncoding(NamedTuple):
    """One encoder pass of a UNet2DModel (a NamedTuple, so torch.func passes it through as a pytree).

    h: (B, C_mid, H_mid, W_mid) the mid block's output (the last down block's if there is no mid block).
    skips: the down blocks' residual outputs, in order, as the up blocks consume them.
    emb: (B, E) time (plus class) embedding.
    timesteps: (B,) the timesteps broadcast to the batch (needed by the Fourier output scaling).
    """

    h: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    emb: torch.Tensor
    timesteps: torch.Tensor


def _check_unet(unet: nn.Module) -> None:
    for name in ("time_proj", "time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "config"):
        if not hasattr(unet, name):
            raise TypeError(f"expected a diffusers UNet2DModel (missing attribute {name!r}); got {type(unet).__name__}")


def _embedding(
    unet: nn.Module, sample: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time (plus class) embedding (B, E) and the batch-broadcast timesteps (B,), as UNet2DModel.forward."""
    timesteps = t
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        if class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels")
        if unet.config.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    elif class_labels is not None:
        raise ValueError("class_labels given but this UNet has no class embedding")
    return emb, timesteps


def encode_with_skips(
    unet: nn.Module, x: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor | None = None
) -> UNetEncoding:
    """Run the UNet up to and including its mid block; keep what `decode` needs to finish.

    x: (B, C_in, H, W) noisy samples; t: int, 0-dim or (B,) timesteps; class_labels: (B,) if the UNet
    is class-conditional.
    """
    _check_unet(unet)
    sample = 2 * x - 1.0 if unet.config.center_input_sample else x
    emb, timesteps = _embedding(unet, sample, t, class_labels)
    skip_sample = sample
    sample = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, res_samples, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        else:
            sample, res_samples = block(hidden_states=sample, temb=emb)
        skips += res_samples
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb)
    return UNetEncoding(h=sample, skips=skips, emb=emb, timesteps=timesteps)


def encode(
    unet: nn.Module, x: torch.Tensor, t: torch.Tensor | float | int, class_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """h = e_t(x): the mid block's output, (B, C_mid, H_mid, W_mid); never runs the up blocks."""
    return encode_with_skips(unet, x, t, class_labels).h


def decode(
    unet: nn.Module,
    h: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    emb: torch.Tensor,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Finish the UNet from an encoder pass: up blocks and output head; returns (B, C_out, H, W).

    With `enc = encode_with_skips(unet, x, t)`, `decode(unet, enc.h, enc.skips, enc.emb, enc.timesteps)`
    equals `unet(x, t).sample`.
    `timesteps` (B,) is needed only for time_embedding_type="fourier".
    """
    _check_unet(unet)
    sample = h
    remaining = tuple(skips)
    skip_sample = None
    for block in unet.up_blocks:
        n_res = len(block.resnets)
        if len(remaining) < n_res:
            raise ValueError(f"too few skips for the up blocks ({len(skips)} given); pass UNetEncoding.skips unchanged")
        res_samples, remaining = remaining[-n_res:], remaining[:-n_res]
        if hasattr(block, "skip_conv"):
            sample, skip_sample = block(sample, res_samples, emb, skip_sample)
        else:
            sample = block(sample, res_samples, emb)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    if skip_sample is not None:
        sample = sample + skip_sample
    if unet.config.time_embedding_type == "fourier":
        if timesteps is None:
            raise ValueError("a Fourier-embedded UNet scales its output by 1/t: pass timesteps")
        sample = sample / timesteps.reshape((sample.shape[0],) + (1,) * (sample.dim() - 1))
    return sample


# --- autodiff-safe kernels -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _group_norm_rejects_strided_tangents(device_type: str) -> bool:
    """Whether this torch build's GroupNorm forward-mode rule fails on non-contiguous tangents."""
    try:
        x = torch.randn(2, 4, 3, 3, device=device_type)
        tangent = torch.randn(2, 3, 3, 4, device=device_type).permute(0, 3, 1, 2)
        torch.func.jvp(lambda y: F.group_norm(y, 2), (x,), (tangent,))
        x3 = torch.randn(2, 4, 5, device=device_type)
        tangent3 = torch.randn(2, 5, 4, device=device_type).transpose(1, 2)
        torch.func.jvp(lambda y: F.group_norm(y, 2), (x3,), (tangent3,))
    except RuntimeError:
        return True
    return False


def _contiguous_group_norm_forward(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    # clone (not .contiguous(), a no-op on a contiguous primal) also lays the tangent out contiguously
    return F.group_norm(x.clone(memory_format=torch.contiguous_format), module.num_groups, module.weight, module.bias, module.eps)


@contextlib.contextmanager
def autodiff_safe(unet: nn.Module, contiguous_group_norm: bool | None = None) -> Iterator[nn.Module]:
    """Within the block, `unet` supports torch.func.jvp and double backward; restored on exit.

    - attention runs on the math SDPA backend (`sdpa_kernel(SDPBackend.MATH)`), which has forward-mode
      and double-backward rules; the flash/efficient kernels have neither;
    - GroupNorm inputs are copied to a contiguous layout, tangent included, when this torch build's
      GroupNorm forward-mode rule rejects strided tangents (`contiguous_group_norm=None` detects it;
      True/False force it).
    Graphs recorded inside the block can be back-propagated after it.
    """
    if contiguous_group_norm is None:
        first = next(unet.parameters(), None)
        contiguous_group_norm = _group_norm_rejects_strided_tangents(first.device.type if first is not None else "cpu")
    patched: list[tuple[nn.Module, object]] = []
    try:
        if contiguous_group_norm:
            for module in unet.modules():
                if isinstance(module, nn.GroupNorm):
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = functools.partial(_contiguous_group_norm_forward, module)
        with sdpa_kernel(SDPBackend.MATH):
            yield unet
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def encoder_at(
    unet: nn.Module,
    t: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    with_skips: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, UNetEncoding]]:
    """The encoder x -> h = e_t(x) at fixed timesteps t (int or (B,)), ready for `isometry_terms`.

    Each call runs inside `autodiff_safe(unet)`. With `with_skips=True` it returns (h, UNetEncoding),
    the form `isometry_terms(..., has_aux=True)` takes, so the same pass can feed `decode` and the
    denoising loss.
    """
    _check_unet(unet)

    def encoder(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, UNetEncoding]:
        with autodiff_safe(unet):
            enc = encode_with_skips(unet, x, t, class_labels)
        return (enc.h, enc) if with_skips else enc.h

    return encoder
