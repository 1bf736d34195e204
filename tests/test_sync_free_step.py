"""The host-sync-free isometry step (core/step.py, `IsoDiffusionLoss.draw` on the generators' device, `drawn=True`,
`FiniteFlags`): on the CPU it computes what the training step computed before, bit for bit, and reads nothing on
the host between the coin and the optimizer step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from isosweep.core.losses import IsoDiffusionLoss, choose_iso, is_baseline, iso_cutoff
from isosweep.core.step import FiniteFlags, reseed, step_generators
from isosweep.models.builtin import default_scheduler
from isosweep.training import loop
from isosweep.training.loop import NonFiniteLossError, check_finite

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {  # (iso_timesteps, share_forward, iso_batch): each way draw and the loss place t and t_iso
    "per_timestep+shared": ("per_timestep", True, 2),
    "per_timestep": ("per_timestep", False, None),
    "pooled+shared": ("pooled", True, 1),
}


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


# --- the step as the training loop took it before: CPU generators, the t_iso read on the host, torch.equal ---------


def _old_generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    shared = np.random.SeedSequence([seed, step, 0]).generate_state(1, dtype=np.uint64)[0]
    local = np.random.SeedSequence([seed, step, 1, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(shared) >> 1), torch.Generator().manual_seed(int(local) >> 1)


def _old_draw(loss_fn: IsoDiffusionLoss, x0, iso_on: bool, generator, shared):
    b = x0.shape[0]
    if is_baseline(loss_fn.lambda_iso, loss_fn.p):
        t = torch.randint(0, loss_fn.T, (b,), generator=generator).to(x0.device)
    else:
        cut = iso_cutoff(loss_fn.p, loss_fn.T)
        lo, hi = (cut, loss_fn.T) if iso_on else (0, cut)
        t = torch.randint(lo, hi, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    if not iso_on or loss_fn.iso_timesteps == "pooled":
        return t, noise, None
    t_iso = torch.full_like(t, int(torch.randint(cut, loss_fn.T, (1,), generator=shared).item()))
    if loss_fn.share_forward:
        t = t.clone()
        t[: loss_fn.iso_samples(b)] = t_iso[0]
    return t, noise, t_iso


def _old_step(unet, opt, loss_fn, x0, abar, seed: int, step: int):
    shared, local = _old_generators(seed, step, 0)
    iso_on = not loss_fn.baseline and choose_iso(loss_fn.p, shared)
    t, noise, t_iso = _old_draw(loss_fn, x0, iso_on, local, shared)
    out = loss_fn(unet, unet, x0, t, noise, iso_on, abar, generator=local, t_iso=t_iso)
    out.loss.backward()
    return out


def _new_step(unet, opt, loss_fn, x0, abar, seed: int, step: int):
    gens = step_generators(seed, step, 0, device=x0.device)
    finite = FiniteFlags(x0.device, since=step)
    iso_on = loss_fn.coin(gens.coin)
    d = loss_fn.draw(x0, iso_on, gens.local, gens.shared)
    out = loss_fn(unet, unet, x0, d.t, d.noise, d.iso_on, abar, generator=gens.local, t_iso=d.t_iso, drawn=True)
    finite.observe(out.dsm, out.iso)
    out.loss.backward()
    assert finite.first() is None
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_sync_free_step_is_bit_identical_on_the_cpu(config):
    """Three optimizer steps (coins on and off) of a small UNet, the old way and the new way from the same seeds:
    equal losses, gradients and weights after Adam, bit for bit."""
    mode, share, k = CONFIGS[config]
    abar = default_scheduler().alphas_cumprod
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    runs = []
    for take in (_old_step, _new_step):
        unet = tiny_unet()
        opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
        loss_fn = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_timesteps=mode, iso_batch=k, share_forward=share)
        trace = []
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            out = take(unet, opt, loss_fn, x0, abar, seed=1, step=step)
            trace.append((out.iso_on, out.loss.detach().clone(), {n: p.grad.clone() for n, p in unet.named_parameters()
                                                                 if p.grad is not None}))
            opt.step()
        runs.append((trace, {n: p.detach().clone() for n, p in unet.named_parameters()}))
    (old, old_weights), (new, new_weights) = runs
    assert {on for on, _, _ in old} == {True, False}  # both coins came up in three steps
    for (on_a, loss_a, g_a), (on_b, loss_b, g_b) in zip(old, new):
        assert on_a == on_b and torch.equal(loss_a, loss_b)
        assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert all(torch.equal(old_weights[n], new_weights[n]) for n in old_weights)


class HostReads(TorchDispatchMode):
    """Fails on every op that reads a tensor's value on the host (a device sync on a GPU) or compares on the host."""

    READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.is_nonzero.default", "aten.allclose.default"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            raise AssertionError(f"host read inside the step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_sync_free_step_reads_nothing_on_the_host(config):
    """Between the coin (a host decision) and the optimizer step, the draw, the loss with its isometry term (JVP and
    VJP), the finite flags and the backward read no tensor value on the host; today's check (drawn=False) does."""
    mode, share, k = CONFIGS[config]
    unet, abar = tiny_unet(), default_scheduler().alphas_cumprod
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    loss_fn = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_timesteps=mode, iso_batch=k, share_forward=share)
    gens = step_generators(3, 0, 0, device="cpu")
    finite = FiniteFlags("cpu")
    with HostReads():
        d = loss_fn.draw(x0, True, gens.local, gens.shared)
        out = loss_fn(unet, unet, x0, d.t, d.noise, True, abar, generator=gens.local, t_iso=d.t_iso, drawn=True)
        finite.observe(out.dsm, out.iso)
        out.loss.backward()
    assert out.iso_on and finite.first() is None
    if share:
        with HostReads(), pytest.raises(AssertionError, match="host read"):
            loss_fn(unet, unet, x0, d.t, d.noise, True, abar, generator=gens.local, t_iso=d.t_iso)


def test_step_generators_keep_the_loops_seeds_and_reseed_in_place():
    """On the CPU the coin is the shared generator (the loop's pair, unchanged); the seeds are the loop's; `reseed`
    puts the same generator objects where a fresh `step_generators` of that step starts."""
    for step in range(3):
        gens = step_generators(7, step, 1, device="cpu")
        shared, local = loop.step_generators(7, step, 1)
        assert gens.coin is gens.shared
        assert torch.equal(gens.shared.get_state(), shared.get_state()) and torch.equal(gens.local.get_state(), local.get_state())
    gens = step_generators(7, 0, 1, device="cpu")
    objects = tuple(map(id, gens))
    torch.rand(5, generator=gens.local), torch.rand(5, generator=gens.shared)
    reseed(gens, 7, 4, 1)
    fresh = step_generators(7, 4, 1, device="cpu")
    assert tuple(map(id, gens)) == objects
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, fresh))


def test_finite_flags_read_late_keep_the_first_bad_value_and_name_the_window():
    """Observed over several steps without a read: the buffers are updated in place (a captured graph writes the
    same memory), the first non-finite value is kept, and the error names the steps since the last clear."""
    finite = FiniteFlags("cpu", since=5)
    ptrs = (finite.flags.data_ptr(), finite.values.data_ptr())
    finite.observe(torch.tensor(1.0), None)
    assert finite.first() is None
    finite.observe(torch.tensor(1.0), torch.tensor(float("nan")))
    finite.observe(torch.tensor(2.0), torch.tensor(float("inf")))
    assert (finite.flags.data_ptr(), finite.values.data_ptr()) == ptrs
    term, value = finite.first()
    assert term == "iso" and np.isnan(value)
    with pytest.raises(NonFiniteLossError, match="iso loss in optimizer steps 6-8"):
        check_finite(finite, 7, 1)
    finite.observe(torch.tensor(float("inf")), None)
    assert finite.first() == ("dsm", float("inf"))  # the dsm term is named first, as before
    finite.clear(9)
    assert finite.first() is None and finite.since == 9
    finite.observe(torch.tensor(float("-inf")), None)
    with pytest.raises(NonFiniteLossError, match="dsm loss at optimizer step 10 "):
        check_finite(finite, 9, 1)
