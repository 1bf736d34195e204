"""DSM loss, the per-batch p split of timesteps, and the combined loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from isosweep.core.geometry import isometry_loss
from isosweep.core.hspace import encoder_at
from isosweep.core.losses import IsoDiffusionLoss, add_noise, denoising_target, dsm_loss, iso_cutoff, sample_timesteps
from isosweep.models.builtin import default_scheduler


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


def test_split_fraction_and_ranges():
    g = torch.Generator().manual_seed(0)
    T, p, n = 1000, 0.3, 4000
    on = 0
    for _ in range(n):
        t, iso = sample_timesteps(4, p, T, g, lambda_iso=1e-4)
        if iso:
            on += 1
            assert t.min() >= iso_cutoff(p, T) == 300  # never iso with t < pT
        else:
            assert t.max() < 300
        assert t.dtype == torch.long and t.shape == (4,) and t.max() < T
    assert abs(on / n - (1 - p)) < 0.03  # binomial sd ~ 0.007


@pytest.mark.parametrize("lam,p", [(0.0, 0.5), (1e-4, 1.0)])
def test_baseline_never_iso_and_uniform(lam, p):
    g = torch.Generator().manual_seed(1)
    ts = []
    for _ in range(500):
        t, iso = sample_timesteps(8, p, 1000, g, lambda_iso=lam)
        assert not iso
        ts.append(t)
    ts = torch.cat(ts).float()
    assert ts.min() < 50 and ts.max() > 950 and abs(ts.mean().item() - 499.5) < 20


def test_p_zero_always_iso():
    g = torch.Generator().manual_seed(2)
    assert all(sample_timesteps(2, 0.0, 1000, g)[1] for _ in range(50))


def test_forced_branch():
    g = torch.Generator().manual_seed(3)
    t, iso = sample_timesteps(64, 0.5, 1000, g, iso_on=False)
    assert not iso and t.max() < 500
    t, iso = sample_timesteps(64, 0.5, 1000, g, iso_on=True)
    assert iso and t.min() >= 500


def test_dsm_loss_zero_for_perfect_predictor():
    sched = default_scheduler()
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    xt = add_noise(x0, noise, t, sched.alphas_cumprod)
    assert torch.allclose(xt, sched.add_noise(x0, noise, t), atol=1e-6)

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": noise})()

    assert dsm_loss(Oracle(), xt, t, noise).item() == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_is_what_diffusers_reads(prediction_type):
    """An output equal to the target makes diffusers' DDIM/DDPM step recover x_0 exactly."""
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type, clip_sample=False)
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    for t in (1, 400, 999):
        tt = torch.full((3,), t)
        xt = add_noise(x0, noise, tt, sched.alphas_cumprod)
        target = denoising_target(prediction_type, x0, noise, tt, sched.alphas_cumprod)
        for s in (sched, DDIMScheduler.from_config(sched.config)):
            if isinstance(s, DDIMScheduler):
                s.set_timesteps(10)
            x0_hat = s.step(target, t, xt).pred_original_sample
            assert torch.allclose(x0_hat, x0, atol=2e-3 if t == 999 and prediction_type == "epsilon" else 1e-4), (t, type(s).__name__)
    if prediction_type == "v_prediction":
        assert torch.allclose(target, sched.get_velocity(x0, noise, tt), atol=1e-6)


def test_combined_loss_uses_the_models_parameterisation():
    """An x_0-predicting oracle has zero denoising loss only when the loss is told prediction_type=sample."""
    sched = default_scheduler()
    x0, noise, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8), torch.tensor([10, 900])

    class X0Oracle(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": x0})()

    oracle = X0Oracle()
    assert IsoDiffusionLoss(lambda_iso=0.0, p=0.5, prediction_type="sample")(oracle, oracle, x0, t, noise, False, sched.alphas_cumprod).dsm.item() == 0.0
    assert IsoDiffusionLoss(lambda_iso=0.0, p=0.5)(oracle, oracle, x0, t, noise, False, sched.alphas_cumprod).dsm.item() > 0.1


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        IsoDiffusionLoss(lambda_iso=1.0, p=0.5, prediction_type="flow")


def test_baseline_loss_skips_isometry(monkeypatch):
    import isosweep.core.geometry as geometry

    def boom(*a, **k):
        raise AssertionError("the baseline must not compute the isometry term")

    monkeypatch.setattr(geometry, "isometry_terms", boom)
    unet, sched = tiny_unet(), default_scheduler()
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = torch.tensor([600, 900])
    for loss_fn in (IsoDiffusionLoss(lambda_iso=0.0, p=0.5), IsoDiffusionLoss(lambda_iso=1.0, p=1.0)):
        out = loss_fn(unet, unet, x0, t, noise, True, sched.alphas_cumprod)
        assert not out.iso_on and out.iso is None and torch.equal(out.loss.detach(), out.dsm)


# hspace: the encoder e_t is everything up to the mid block, so L_iso can reach only these; the rest runs after h
ENCODER = ("time_embedding", "conv_in", "down_blocks", "mid_block")
DECODER = ("up_blocks", "conv_norm_out", "conv_out")


def _grads(unet, loss) -> dict[str, torch.Tensor]:
    """d loss / d parameter for every parameter of `unet` (zeros where the loss does not reach)."""
    unet.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in unet.named_parameters()}
    unet.zero_grad(set_to_none=True)
    return grads


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).norm() <= 1e-4 * (a.norm() + b.norm()) + 1e-9)


@pytest.mark.parametrize("metric", ["stereographic", "identity", "ambient"])
def test_combined_loss(metric):
    """L = L_dsm + lambda * L_iso in value and in gradient, against both terms computed here on their own:
    L_dsm as the MSE of the UNet's output on diffusers' x_t against the noise, L_iso by geometry.isometry_loss
    on hspace.encoder_at with the same probes. The isometry gradient is lambda-weighted and stays in the encoder:
    the decoder gets exactly the denoising gradient whatever lambda is."""
    unet, sched = tiny_unet(), default_scheduler()
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([600, 700, 800, 999])

    x_t = sched.add_noise(x0, noise, t)
    dsm = F.mse_loss(unet(x_t, t).sample, noise)
    g_dsm = _grads(unet, dsm)
    iso = isometry_loss(encoder_at(unet, t), x_t, metric, generator=torch.Generator().manual_seed(0))
    g_iso = _grads(unet, iso)
    assert all(any(g_iso[n].any() for n in g_iso if n.startswith(block)) for block in ENCODER)
    assert all(not g_iso[n].any() for n in g_iso if n.startswith(DECODER))
    assert {n.split(".")[0] for n in g_dsm} <= set(ENCODER + DECODER)  # every parameter is on one side

    totals = {}
    for lam in (0.5, 2.0):
        loss_fn = IsoDiffusionLoss(lambda_iso=lam, p=0.5, iso_metric=metric)
        out = loss_fn(unet, unet, x0, t, noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(0))
        assert out.iso_on and out.tr_r > 0
        assert torch.allclose(out.dsm, dsm.detach(), rtol=1e-5) and torch.allclose(out.iso, iso.detach(), rtol=1e-4)
        assert torch.allclose(out.loss.detach(), dsm.detach() + lam * iso.detach(), rtol=1e-4)
        totals[lam] = g = _grads(unet, out.loss)
        for name in g:
            assert _close(g[name], g_dsm[name] + lam * g_iso[name]), (lam, name)
    for name in totals[0.5]:
        if name.startswith(DECODER):  # lambda never reaches the decoder
            assert torch.equal(totals[0.5][name], totals[2.0][name]), name
    assert not torch.equal(totals[0.5]["conv_in.weight"], totals[2.0]["conv_in.weight"])


# ---------------------------------------------------------------- the isometry term's timesteps (Eq. 6)


def _explicit_jacobian(unet, x: torch.Tensor, t: int) -> torch.Tensor:
    """J_e = dh/dx (m, n) at one sample x (C, H, W), h the mid block's output read by a forward hook on the
    whole UNet (not through hspace): one batched backward with the identity as the output cotangent."""
    n = x.numel()
    captured = []
    hook = unet.mid_block.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        unet(x[None], torch.tensor([t]))
        m = captured.pop().numel()  # dim H
        xs = x.reshape(1, n).repeat(m, 1).requires_grad_(True)  # one copy of x per output coordinate
        unet(xs.reshape(m, *x.shape), torch.full((m,), t))
        h = captured.pop().reshape(m, m)
    finally:
        hook.remove()
    (jac,) = torch.autograd.grad(h, xs, torch.eye(m))  # row i: d h_i / d x (the copies are independent)
    return jac.double()


def _explicit_ratio(unet, x_t: torch.Tensor, t: torch.Tensor, probes: torch.Tensor) -> float:
    """mean(Tr R^2) / mean(Tr R)^2 of the one-probe estimator, built from explicit Jacobians: with
    P = I - x x^T / r^2, A = J^T J and u = P v, Tr R ~ u^T A u and Tr R^2 ~ |P A u|^2 (stereographic G)."""
    tr_r, tr_r2 = [], []
    for xi, ti, vi in zip(x_t, t.tolist(), probes):
        jac, x, v = _explicit_jacobian(unet, xi, ti), xi.reshape(-1).double(), vi.reshape(-1).double()
        proj = torch.eye(x.numel(), dtype=torch.float64) - torch.outer(x, x) / x.dot(x)
        a, u = jac.T @ jac, proj @ v
        tr_r.append(u @ a @ u)
        tr_r2.append((proj @ a @ u).pow(2).sum())
    return (torch.stack(tr_r2).mean() / torch.stack(tr_r).mean() ** 2).item()


def _draw_and_loss(mode: str, lam: float = 0.5, p: float = 0.5):
    unet, sched = tiny_unet(), default_scheduler()
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    loss_fn = IsoDiffusionLoss(lambda_iso=lam, p=p, iso_timesteps=mode)
    d = loss_fn.draw(x0, True, torch.Generator().manual_seed(12), torch.Generator().manual_seed(13))
    out = loss_fn(unet, unet, x0, d.t, d.noise, d.iso_on, sched.alphas_cumprod, generator=torch.Generator().manual_seed(14),
                  t_iso=d.t_iso)
    probes = torch.randn(x0.shape, generator=torch.Generator().manual_seed(14))  # what isometry_terms draws first
    dsm = F.mse_loss(unet(sched.add_noise(x0, d.noise, d.t), d.t).sample, d.noise)
    return unet, sched, x0, d, out, probes, dsm


def test_per_timestep_is_eq6_at_the_shared_t_times_lambda():
    """per_timestep: L_iso is the ratio of the means over the batch at its one t_iso (x_{t_iso} from the same x0 and
    noise), weighted by lambda_iso(p, t_iso) = lambda_iso; L_dsm keeps its per-sample t. Against explicit Jacobians."""
    lam, p = 0.5, 0.5
    unet, sched, x0, d, out, probes, dsm = _draw_and_loss("per_timestep", lam, p)
    t_iso = int(d.t_iso[0])
    assert d.t_iso.shape == (4,) and torch.equal(d.t_iso, torch.full((4,), t_iso)) and iso_cutoff(p, 1000) <= t_iso < 1000
    assert d.t.unique().numel() > 1 and d.t.min() >= iso_cutoff(p, 1000)  # the denoising t: per sample, in [pT, T)
    x_iso = sched.add_noise(x0, d.noise, d.t_iso)
    expected = _explicit_ratio(unet, x_iso, d.t_iso, probes)
    assert out.iso_on and out.iso.item() == pytest.approx(expected, rel=1e-4)
    assert out.dsm.item() == pytest.approx(dsm.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(dsm.item() + lam * expected, rel=1e-5)
    pooled = _explicit_ratio(unet, sched.add_noise(x0, d.noise, d.t), d.t, probes)
    assert abs(pooled - expected) > 1e-3 * expected  # the two modes are different numbers here


def test_pooled_is_todays_ratio_over_the_samples_own_t():
    """pooled: one ratio over the batch with each sample at its own (denoising) t, as before; against explicit Jacobians."""
    lam = 0.5
    unet, sched, x0, d, out, probes, dsm = _draw_and_loss("pooled", lam)
    assert d.t_iso is None and d.t.unique().numel() > 1
    expected = _explicit_ratio(unet, sched.add_noise(x0, d.noise, d.t), d.t, probes)
    assert out.iso.item() == pytest.approx(expected, rel=1e-4)
    assert out.loss.item() == pytest.approx(dsm.item() + lam * expected, rel=1e-5)


def test_pooled_draws_as_before_and_per_timestep_only_adds_a_shared_draw():
    """pooled takes the same numbers from the same generator in the same order as before (old runs reproduce);
    per_timestep takes exactly those too, and its t_iso from the shared generator only."""
    x0, p = torch.zeros(5, 3, 8, 8), 0.5
    for iso_on in (True, False):
        old = torch.Generator().manual_seed(21)
        t_old, _ = sample_timesteps(5, p, 1000, old, lambda_iso=1.0, iso_on=iso_on)
        noise_old = torch.randn(x0.shape, generator=old)
        after_old = torch.rand(3, generator=old)
        for mode in ("pooled", "per_timestep"):
            local, shared = torch.Generator().manual_seed(21), torch.Generator().manual_seed(22)
            d = IsoDiffusionLoss(lambda_iso=1.0, p=p, iso_timesteps=mode).draw(x0, iso_on, local, shared)
            assert torch.equal(d.t, t_old) and torch.equal(d.noise, noise_old) and d.iso_on == iso_on
            assert torch.equal(torch.rand(3, generator=local), after_old)  # the local stream is where it was
            untouched = mode == "pooled" or not iso_on
            assert (d.t_iso is None) == untouched
            assert torch.equal(shared.get_state(), torch.Generator().manual_seed(22).get_state()) == untouched


def test_per_timestep_shares_t_across_ranks_and_the_batch():
    """Two ranks with the same shared generator state (and their own local streams) draw the same coin and the
    same t_iso for each micro-batch; t_iso is spread over [pT, T) from micro-batch to micro-batch."""
    p, x0 = 0.3, torch.zeros(3, 3, 8, 8)
    loss_fn = IsoDiffusionLoss(lambda_iso=1.0, p=p)
    assert loss_fn.iso_timesteps == "per_timestep"  # the default, as the paper writes it
    seen = []
    for step in range(30):
        draws = []
        for rank in range(2):
            shared, local = torch.Generator().manual_seed(1000 + step), torch.Generator().manual_seed(10 * step + rank)
            iso_on = loss_fn.coin(shared)
            draws.append([loss_fn.draw(x0, iso_on, local, shared) for _ in range(2)])  # two accumulation micro-batches
        for a, b in zip(*draws):
            assert a.iso_on == b.iso_on and not torch.equal(a.t, b.t)  # denoising t: each rank its own
            if a.iso_on:
                assert torch.equal(a.t_iso, b.t_iso) and a.t_iso.unique().numel() == 1 and a.t_iso.min() >= iso_cutoff(p, 1000)
                seen.append(int(a.t_iso[0]))
            else:
                assert a.t_iso is None and b.t_iso is None
    assert len(seen) > 20 and len(set(seen)) > 0.8 * len(seen) and min(seen) < 500 < max(seen)


def test_iso_timesteps_errors_name_the_choice():
    with pytest.raises(ValueError, match="iso_timesteps 'mixed'.*per_timestep"):
        IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_timesteps="mixed")
    with pytest.raises(ValueError, match="shared"):
        IsoDiffusionLoss(lambda_iso=1.0, p=0.5).draw(torch.zeros(2, 3, 8, 8), True, torch.Generator().manual_seed(0))


# --- cost levers: the isometry term on a sub-batch, and one encoder pass shared with the denoising term ---------


@pytest.mark.parametrize("mode", ["per_timestep", "pooled"])
def test_iso_batch_is_the_full_loss_on_the_first_k_samples(mode):
    """iso_batch=k: L_iso is exactly the loss of the whole-batch estimator computed on the micro-batch's first k
    samples (same x0, noise, t_iso, probes), in value and in gradient; L_dsm still averages all B samples."""
    unet, sched = tiny_unet(), default_scheduler()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(21)) * 2 - 1
    sub = IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_timesteps=mode, iso_batch=2)
    full = IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_timesteps=mode)
    d = sub.draw(x0, True, torch.Generator().manual_seed(22), torch.Generator().manual_seed(23))
    same = full.draw(x0, True, torch.Generator().manual_seed(22), torch.Generator().manual_seed(23))
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(d, same))  # iso_batch changes no draw
    out = sub(unet, unet, x0, d.t, d.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(24), t_iso=d.t_iso)
    t_iso_k = None if d.t_iso is None else d.t_iso[:2]
    ref = full(unet, unet, x0[:2], d.t[:2], d.noise[:2], True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(24),
               t_iso=t_iso_k)
    assert out.iso.item() == pytest.approx(ref.iso.item(), rel=1e-6)
    assert out.tr_r.item() == pytest.approx(ref.tr_r.item(), rel=1e-6)
    dsm_all = F.mse_loss(unet(sched.add_noise(x0, d.noise, d.t), d.t).sample, d.noise)
    assert out.dsm.item() == pytest.approx(dsm_all.item(), rel=1e-5)
    g_sub = _grads(unet, out.loss - _dsm_graph(unet, sched, x0, d))  # the isometry term's gradient alone
    g_ref = _grads(unet, ref.loss - _dsm_graph(unet, sched, x0[:2], d, k=2))
    assert all(_close(g_sub[n], g_ref[n]) for n in g_sub)
    whole = full(unet, unet, x0, d.t, d.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(24), t_iso=d.t_iso)
    assert abs(whole.iso.item() - out.iso.item()) > 1e-4 * whole.iso.item()  # k = 2 of 4 is a different estimate


def _dsm_graph(unet, sched, x0, d, k=None):
    """The denoising MSE with its graph, on the first k samples of the draw (all when k is None)."""
    k = x0.shape[0] if k is None else k
    return F.mse_loss(unet(sched.add_noise(x0, d.noise[:k], d.t[:k]), d.t[:k]).sample, d.noise[:k])


def test_iso_batch_above_the_micro_batch_uses_all_and_bad_values_are_refused():
    assert IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_batch=16).iso_samples(4) == 4
    assert IsoDiffusionLoss(lambda_iso=1.0, p=0.5).iso_samples(4) == 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="iso_batch"):
            IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_batch=bad)


@pytest.mark.parametrize("k", [2, 4])
def test_shared_forward_equals_the_unshared_loss_for_pooled(k):
    """pooled: denoising the iso sub-batch from the JVP's encoder pass gives the same loss and the same gradient
    as a separate denoising forward (same draws), whether the sub-batch is part of the micro-batch or all of it."""
    unet, sched = tiny_unet(), default_scheduler()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(31)) * 2 - 1
    outs, grads = [], []
    for share in (False, True):
        loss_fn = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_timesteps="pooled", iso_batch=k, share_forward=share)
        d = loss_fn.draw(x0, True, torch.Generator().manual_seed(32), torch.Generator().manual_seed(33))
        out = loss_fn(unet, unet, x0, d.t, d.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(34))
        outs.append((d, out))
        grads.append(_grads(unet, out.loss))
    (d0, a), (d1, b) = outs
    assert torch.equal(d0.t, d1.t) and torch.equal(d0.noise, d1.noise)  # pooled: sharing changes no draw
    assert b.dsm.item() == pytest.approx(a.dsm.item(), rel=1e-5) and b.iso.item() == pytest.approx(a.iso.item(), rel=1e-5)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    assert all(_close(grads[0][n], grads[1][n]) for n in grads[0])


def test_shared_forward_per_timestep_denoises_the_sub_batch_at_t_iso():
    """per_timestep + share_forward: `draw` gives the first k samples the denoising t = t_iso and leaves the others'
    draws as they were; the loss then equals the unshared loss at those timesteps (value and gradient)."""
    unet, sched = tiny_unet(), default_scheduler()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(41)) * 2 - 1
    plain = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_batch=2)
    shared = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_batch=2, share_forward=True)
    d0 = plain.draw(x0, True, torch.Generator().manual_seed(42), torch.Generator().manual_seed(43))
    d1 = shared.draw(x0, True, torch.Generator().manual_seed(42), torch.Generator().manual_seed(43))
    assert torch.equal(d1.t[:2], d1.t_iso[:2]) and torch.equal(d1.t[2:], d0.t[2:]) and not torch.equal(d0.t[:2], d1.t[:2])
    assert torch.equal(d0.noise, d1.noise) and torch.equal(d0.t_iso, d1.t_iso)
    a = plain(unet, unet, x0, d1.t, d1.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(44), t_iso=d1.t_iso)
    g_a = _grads(unet, a.loss)
    b = shared(unet, unet, x0, d1.t, d1.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(44), t_iso=d1.t_iso)
    g_b = _grads(unet, b.loss)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5) and b.dsm.item() == pytest.approx(a.dsm.item(), rel=1e-5)
    assert all(_close(g_a[n], g_b[n]) for n in g_a)
    with pytest.raises(ValueError, match="t_iso|isometry term's t"):  # timesteps not drawn for sharing
        shared(unet, unet, x0, d0.t, d0.noise, True, sched.alphas_cumprod, generator=torch.Generator().manual_seed(44), t_iso=d0.t_iso)


def test_shared_forward_under_a_wrapper_needs_a_sample_outside_the_iso_batch():
    """A DDP wrapper that runs no forward would not all-reduce the gradients: sharing the whole micro-batch is refused."""
    unet, sched = tiny_unet(), default_scheduler()
    wrapper = torch.nn.Sequential(unet)  # any module other than `unet` stands for the DDP wrapper
    wrapper.forward = lambda x, t: unet(x, t)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    loss_fn = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_timesteps="pooled", share_forward=True)
    d = loss_fn.draw(x0, True, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="iso_batch"):
        loss_fn(wrapper, unet, x0, d.t, d.noise, True, sched.alphas_cumprod)
    ok = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_timesteps="pooled", share_forward=True, iso_batch=1)
    assert ok(wrapper, unet, x0, d.t, d.noise, True, sched.alphas_cumprod).iso_on


# --- lazy regularisation: the isometry term on every n-th step, weighted n x lambda_iso ---------------------------


def test_iso_every_takes_the_term_n_times_heavier_on_due_steps_only():
    """iso_every=n: due(step) holds on steps 0, n, 2n, ...; where the term is taken the loss is L_dsm + n lambda L_iso
    with the same L_dsm and L_iso as the every-step loss (same draws), so a trial's expected isometry gradient per
    step is the paper's; a skipped step keeps the iso range's timesteps and noise and draws no t_iso."""
    unet, sched = tiny_unet(), default_scheduler()
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(31)) * 2 - 1
    lazy = IsoDiffusionLoss(lambda_iso=0.5, p=0.5, iso_every=3)
    every = IsoDiffusionLoss(lambda_iso=0.5, p=0.5)
    assert [s for s in range(10) if lazy.due(s)] == [0, 3, 6, 9] and all(every.due(s) for s in range(10))
    d = lazy.draw(x0, True, torch.Generator().manual_seed(32), torch.Generator().manual_seed(33))
    same = every.draw(x0, True, torch.Generator().manual_seed(32), torch.Generator().manual_seed(33))
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(d, same))
    probes = lambda: torch.Generator().manual_seed(34)
    out = lazy(unet, unet, x0, d.t, d.noise, True, sched.alphas_cumprod, generator=probes(), t_iso=d.t_iso)
    ref = every(unet, unet, x0, d.t, d.noise, True, sched.alphas_cumprod, generator=probes(), t_iso=d.t_iso)
    assert out.iso.item() == pytest.approx(ref.iso.item(), rel=1e-6) and out.dsm.item() == pytest.approx(ref.dsm.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(ref.dsm.item() + 3 * 0.5 * ref.iso.item(), rel=1e-6)
    g_lazy = _grads(unet, out.loss - _dsm_graph(unet, sched, x0, d))  # the isometry part of the gradient
    g_every = _grads(unet, ref.loss - _dsm_graph(unet, sched, x0, d))
    flat = lambda g: torch.cat([g[n].flatten() for n in g if n.startswith(ENCODER)])  # the term reaches only these
    assert _close(flat(g_lazy), 3 * flat(g_every)) and flat(g_every).norm() > 0
    skipped = lazy.draw(x0, True, torch.Generator().manual_seed(32), torch.Generator().manual_seed(33), term=False)
    assert torch.equal(skipped.t, d.t) and torch.equal(skipped.noise, d.noise) and skipped.t_iso is None and skipped.iso_on
    off = lazy(unet, unet, x0, skipped.t, skipped.noise, False, sched.alphas_cumprod)
    assert off.iso is None and off.loss.item() == pytest.approx(ref.dsm.item(), rel=1e-6)


def test_iso_every_bad_values_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="iso_every"):
            IsoDiffusionLoss(lambda_iso=1.0, p=0.5, iso_every=bad)
