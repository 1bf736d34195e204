"""The UNet2DModel encoder (up to mid_block), finishing the UNet from it, and the AD-safe kernels."""

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from isosweep.core.geometry import isometry_loss, isometry_terms
from isosweep.core.hspace import autodiff_safe, decode, encode, encode_with_skips, encoder_at

# Small UNet2DModel layouts built from config: no attention at all, diffusers' default (attention
# in down, mid and up blocks), the CelebA-HQ DDPM's (google/ddpm-ema-celebahq-256: one attention
# down block, padding 0, freq_shift 1, no sin/cos flip; channels shrunk), a class-conditional one
# with centred input, and an NCSN++-like one with Fourier time features and skip blocks.
CONFIGS = {
    "no_attention": dict(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        layers_per_block=1,
        norm_num_groups=4,
    ),
    "default_attention": dict(
        sample_size=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    ),
    "celebahq_layout": dict(  # 64 px: a 2x2 bottleneck, so its attention has more than one token
        sample_size=64,
        block_out_channels=(4, 4, 8, 8, 16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=4,
    ),
    "class_conditional_centred": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        center_input_sample=True,
        num_class_embeds=3,
    ),
    "fourier_skip": dict(  # diffusers' skip attention blocks hard-code 32 groups: 32 channels at least
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        time_embedding_type="fourier",
        mid_block_scale_factor=2**-0.5,
    ),
}


def make_unet(name: str, dtype=torch.float32) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS[name]).to(dtype)
    # diffusers zero-initialises some output convolutions; random weights make every path count
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def inputs(unet: UNet2DModel, batch: int = 2, dtype=torch.float32):
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=gen, dtype=dtype)
    if unet.config.time_embedding_type == "fourier":
        t = torch.tensor([0.3, 0.9])[:batch]
    else:
        t = torch.tensor([17, 930])[:batch]
    labels = torch.tensor([0, 2])[:batch] if unet.config.num_class_embeds else None
    return x, t, labels


def hooked_mid_output(unet, x, t, labels):
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: captured.update(h=out))
    try:
        out = unet(x, t, class_labels=labels).sample
    finally:
        handle.remove()
    return captured["h"], out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_equals_the_mid_block_output_of_the_full_forward(name):
    unet = make_unet(name)
    x, t, labels = inputs(unet)
    with torch.no_grad():
        want_h, want_out = hooked_mid_output(unet, x, t, labels)
        enc = encode_with_skips(unet, x, t, labels)
        torch.testing.assert_close(encode(unet, x, t, labels), want_h, rtol=0, atol=0)
        torch.testing.assert_close(enc.h, want_h, rtol=0, atol=0)
        # finishing from the encoder's outputs gives the full UNet's output
        torch.testing.assert_close(decode(unet, enc.h, enc.skips, enc.emb, enc.timesteps), want_out, rtol=0, atol=0)


def test_encode_accepts_scalar_timesteps_like_forward():
    unet = make_unet("no_attention")
    x, _, _ = inputs(unet)
    with torch.no_grad():
        want, _ = hooked_mid_output(unet, x, 500, None)
        torch.testing.assert_close(encode(unet, x, 500), want, rtol=0, atol=0)
        torch.testing.assert_close(encode(unet, x, torch.tensor(500)), want, rtol=0, atol=0)


def test_encode_never_runs_the_up_blocks():
    unet = make_unet("default_attention")
    x, t, _ = inputs(unet)
    calls = []
    for block in [*unet.up_blocks, unet.conv_out]:
        block.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        encode(unet, x, t)
    assert calls == []


def test_class_labels_are_checked():
    unet = make_unet("class_conditional_centred")
    x, t, _ = inputs(unet)
    with pytest.raises(ValueError, match="class_labels"):
        encode(unet, x, t)
    with pytest.raises(TypeError, match="UNet2DModel"):
        encode(nn.Linear(2, 2), x, t)


# --- autodiff-safe kernels ---------------------------------------------------------------------------


def test_autodiff_safe_patches_group_norm_only_inside_and_keeps_values():
    unet = make_unet("default_attention")
    x, t, _ = inputs(unet)
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    with torch.no_grad():
        before = encode(unet, x, t)
    flash_before = torch.backends.cuda.flash_sdp_enabled()
    with autodiff_safe(unet, contiguous_group_norm=True):
        assert all("forward" in m.__dict__ for m in norms)
        assert not torch.backends.cuda.flash_sdp_enabled()
        u = torch.randn_like(x)
        h, ju = torch.func.jvp(lambda y: encode(unet, y, t), (x,), (u,))
    assert all("forward" not in m.__dict__ for m in norms)
    assert torch.backends.cuda.flash_sdp_enabled() == flash_before
    torch.testing.assert_close(h, before, rtol=1e-5, atol=1e-6)
    # the JVP agrees with a central finite difference
    eps = 1e-3
    with torch.no_grad():
        fd = (encode(unet, x + eps * u, t) - encode(unet, x - eps * u, t)) / (2 * eps)
    torch.testing.assert_close(ju, fd, rtol=2e-2, atol=2e-3)


def test_autodiff_safe_restores_after_an_error():
    unet = make_unet("no_attention")
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    with pytest.raises(KeyError):
        with autodiff_safe(unet, contiguous_group_norm=True):
            raise KeyError("boom")
    assert all("forward" not in m.__dict__ for m in norms)


def test_shared_encoder_pass_feeds_decode():
    unet = make_unet("default_attention")
    x, t, _ = inputs(unet)
    tr_r, tr_r2, enc = isometry_terms(
        encoder_at(unet, t, with_skips=True), x, generator=torch.Generator().manual_seed(0), has_aux=True
    )
    out = decode(unet, enc.h, enc.skips, enc.emb, enc.timesteps)
    with torch.no_grad():
        want = unet(x, t).sample
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert out.requires_grad and tr_r.shape == tr_r2.shape == (2,)


# --- the isometry loss on a real UNet ----------------------------------------------------------------


def _encoder_parameter_names(unet):
    return [n for n, _ in unet.named_parameters() if not n.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]


@pytest.mark.parametrize("name", ["default_attention", "celebahq_layout"])
def test_isometry_gradients_reach_every_encoder_parameter_and_no_up_block(name):
    unet = make_unet(name)
    x, t, _ = inputs(unet, batch=1)
    loss = isometry_loss(encoder_at(unet, t), x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    # the mid block's last convolution bias only shifts h: it cannot change the Jacobian
    constant_shift = f"mid_block.resnets.{len(unet.mid_block.resnets) - 1}.conv2.bias"
    for n, p in unet.named_parameters():
        if n in _encoder_parameter_names(unet) and n != constant_shift:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"no gradient reaches {n}"
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"unexpected gradient on {n}"


def test_unet_gradients_equal_double_backward_reference():
    unet = make_unet("default_attention", dtype=torch.float64)
    x, t, _ = inputs(unet, dtype=torch.float64)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for n, p in unet.named_parameters() if n in _encoder_parameter_names(unet)]

    loss = isometry_loss(encoder_at(unet, t), x, probes=v)
    ours = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    # reference: h from the full UNet's forward (hook), double-backward JVP and VJP, all create_graph
    def full_unet_h(y):
        return hooked_mid_output(unet, y, t, None)[0]

    flat = x.reshape(2, -1)
    u = (v.reshape(2, -1) - flat * (flat * v.reshape(2, -1)).sum(1, keepdim=True) / flat.pow(2).sum(1, keepdim=True)).reshape(x.shape)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, ju = torch.autograd.functional.jvp(full_unet_h, x, u, create_graph=True)
        _, w = torch.autograd.functional.vjp(full_unet_h, x, ju, create_graph=True)
    wf = w.reshape(2, -1)
    pw = wf - flat * (flat * wf).sum(1, keepdim=True) / flat.pow(2).sum(1, keepdim=True)
    ref_loss = pw.pow(2).sum(1).mean() / ju.reshape(2, -1).pow(2).sum(1).mean() ** 2
    ref = torch.autograd.grad(ref_loss, params, allow_unused=True, materialize_grads=True)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
