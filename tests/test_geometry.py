"""The chart, its metric and the isometry loss against explicit Jacobians (docs/math.md sections 2-3).

Known answers come from building f = e o Pi^{-1} in the stereographic chart and differentiating it
with torch.autograd.functional.jacobian, independently of the chart-free code under test.
"""

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from isosweep.core.geometry import (
    ISO_METRICS,
    conformal_factor,
    inverse_stereographic,
    isometry_loss,
    isometry_ratio,
    isometry_terms,
    stereographic,
)

DT = torch.float64
N = 6  # noise-space dimension of the toy encoders
M = 4  # semantic-space dimension


def _points(batch: int = 5, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=g, dtype=DT) * 3.0


class Linear(torch.nn.Module):
    def __init__(self, m: int = M, n: int = N, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(m, n, generator=g, dtype=DT))

    def forward(self, x):
        return x @ self.weight.T


class Tiny(torch.nn.Module):
    """A small nonlinear encoder whose Jacobian changes from point to point."""

    def __init__(self, m: int = M, n: int = N, hidden: int = 7, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, m)).to(DT)

    def forward(self, x):
        return self.net(x)


# --- explicit references -----------------------------------------------------------------------------


def chart_traces(encoder, x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Tr(R), Tr(R^2) per sample from the explicit Jacobian in the chart (or in R^n for ambient)."""
    out_r, out_r2 = [], []
    for xi in x:
        if metric == "ambient":
            J = torch.autograd.functional.jacobian(lambda y: encoder(y[None])[0].reshape(-1), xi)
            R = J.T @ J
        else:
            r = xi.norm()
            zi = stereographic(xi[None])[0]
            J = torch.autograd.functional.jacobian(lambda z: encoder(inverse_stereographic(z[None], r))[0].reshape(-1), zi)
            # the sphere's metric in the chart, written from z (not from x): G = 4 r^2 / (1 + |z|^2)^2 I
            g = 4 * r**2 / (1 + zi.pow(2).sum()) ** 2
            G = torch.eye(zi.numel(), dtype=DT) * (g if metric == "stereographic" else 1.0)
            R = J.T @ J @ torch.linalg.inv(G)
        out_r.append(torch.trace(R))
        out_r2.append(torch.trace(R @ R))
    return torch.stack(out_r), torch.stack(out_r2)


def projector_traces(encoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tr(P A) and Tr(P A P A) with P = I - x x^T / r^2, A = J_e^T J_e."""
    out_r, out_r2 = [], []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda y: encoder(y[None])[0].reshape(-1), xi)
        A = J.T @ J
        P = torch.eye(xi.numel(), dtype=DT) - torch.outer(xi, xi) / xi.dot(xi)
        out_r.append(torch.trace(P @ A))
        out_r2.append(torch.trace(P @ A @ P @ A))
    return torch.stack(out_r), torch.stack(out_r2)


def basis_probe_traces(encoder, x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator summed over the standard basis as probes: sum_i est(e_i) = the exact trace."""
    b, n = x.shape
    xs = x.repeat_interleave(n, dim=0)
    probes = torch.eye(n, dtype=DT).repeat(b, 1)
    tr_r, tr_r2 = isometry_terms(encoder, xs, metric=metric, probes=probes)
    return tr_r.reshape(b, n).sum(1), tr_r2.reshape(b, n).sum(1)


# --- chart -------------------------------------------------------------------------------------------


def test_chart_round_trip():
    x = _points(8)
    z = stereographic(x)
    assert z.shape == (8, N - 1)
    torch.testing.assert_close(inverse_stereographic(z, x.norm(dim=1)), x)
    z2 = torch.randn(8, N - 1, dtype=DT)
    r = torch.rand(8, dtype=DT) + 0.5
    x2 = inverse_stereographic(z2, r)
    torch.testing.assert_close(x2.norm(dim=1), r)
    torch.testing.assert_close(stereographic(x2), z2)


def test_chart_flattens_image_batches():
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    torch.testing.assert_close(stereographic(x), stereographic(x.reshape(3, -1)))
    assert conformal_factor(x).shape == (3,)


def test_conformal_factor_is_the_pulled_back_metric_and_varies():
    x = _points(16)
    z = stereographic(x)
    r = x.norm(dim=1)
    g = conformal_factor(x)
    torch.testing.assert_close(g, 4 * r**2 / (1 + z.pow(2).sum(1)) ** 2)
    # G(z) = dPi^{-1}^T dPi^{-1} really is g I (not I, which is what a radius computed from |z| gives)
    for zi, ri, gi in zip(z[:4], r[:4], g[:4]):
        D = torch.autograd.functional.jacobian(lambda w: inverse_stereographic(w[None], ri)[0], zi)
        torch.testing.assert_close(D.T @ D, gi * torch.eye(N - 1, dtype=DT))
    # on one sphere, g still varies a lot from point to point
    on_sphere = x / r[:, None] * 5.0
    g_sphere = conformal_factor(on_sphere)
    assert (g_sphere.max() / g_sphere.min()) > 10.0


# --- exact traces: chart vs chart-free vs estimator --------------------------------------------------


@pytest.mark.parametrize("encoder_cls", [Linear, Tiny])
@pytest.mark.parametrize("metric", ISO_METRICS)
def test_estimator_with_basis_probes_equals_explicit_chart_jacobian(encoder_cls, metric):
    encoder = encoder_cls()
    x = _points(4)
    want_r, want_r2 = chart_traces(encoder, x, metric)
    got_r, got_r2 = basis_probe_traces(encoder, x, metric)
    torch.testing.assert_close(got_r, want_r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_r2, want_r2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("encoder_cls", [Linear, Tiny])
def test_tangent_projector_formulas_equal_the_chart(encoder_cls):
    encoder = encoder_cls()
    x = _points(4)
    chart_r, chart_r2 = chart_traces(encoder, x, "stereographic")
    proj_r, proj_r2 = projector_traces(encoder, x)
    torch.testing.assert_close(proj_r, chart_r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(proj_r2, chart_r2, rtol=1e-9, atol=1e-12)
    # identity metric = the same traces times g and g^2
    id_r, id_r2 = chart_traces(encoder, x, "identity")
    g = conformal_factor(x)
    torch.testing.assert_close(id_r, g * chart_r)
    torch.testing.assert_close(id_r2, g**2 * chart_r2)


@pytest.mark.parametrize("metric", ISO_METRICS)
def test_hutchinson_means_converge_to_exact_traces(metric):
    encoder = Tiny()
    x = _points(3)
    want_r, want_r2 = chart_traces(encoder, x, metric)
    probes_per_point = 4000
    xs = x.repeat_interleave(probes_per_point, dim=0)
    gen = torch.Generator().manual_seed(123)
    tr_r, tr_r2 = isometry_terms(encoder, xs, metric=metric, generator=gen)
    mean_r = tr_r.reshape(3, probes_per_point).mean(1)
    mean_r2 = tr_r2.reshape(3, probes_per_point).mean(1)
    torch.testing.assert_close(mean_r, want_r, rtol=0.06, atol=0)
    torch.testing.assert_close(mean_r2, want_r2, rtol=0.10, atol=0)
    # and the loss of the replicated batch converges to the exact ratio of means
    exact = want_r2.mean() / want_r.mean() ** 2
    assert abs(isometry_ratio(tr_r, tr_r2).item() / exact.item() - 1) < 0.1


def test_probes_are_reproducible_with_a_generator():
    encoder, x = Tiny(), _points(4)
    a = isometry_terms(encoder, x, generator=torch.Generator().manual_seed(7))
    b = isometry_terms(encoder, x, generator=torch.Generator().manual_seed(7))
    c = isometry_terms(encoder, x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0])


# --- properties of the loss --------------------------------------------------------------------------


def test_loss_is_scale_invariant():
    encoder, x = Tiny(), _points(6)
    probes = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    base = isometry_loss(encoder, x, probes=probes)
    scaled = isometry_loss(lambda y: 7.3 * encoder(y), x, probes=probes)
    torch.testing.assert_close(scaled, base)
    tr_r, _ = isometry_terms(encoder, x, probes=probes)
    tr_r_scaled, _ = isometry_terms(lambda y: 7.3 * encoder(y), x, probes=probes)
    torch.testing.assert_close(tr_r_scaled, 7.3**2 * tr_r)


def _exact_loss(encoder, x, metric="stereographic"):
    tr_r, tr_r2 = basis_probe_traces(encoder, x, metric)
    return (tr_r2.mean() / tr_r.mean() ** 2).item()


def test_minimum_one_over_n_minus_one_for_an_isometric_linear_map():
    # m = n here: R can have full rank n - 1 (n for ambient), so the bound is 1/(n-1) (1/n)
    q, _ = torch.linalg.qr(torch.randn(N, N, dtype=DT, generator=torch.Generator().manual_seed(4)))
    x = _points(5)
    isometric = lambda y: 2.5 * y @ q.T  # noqa: E731
    assert _exact_loss(isometric, x) == pytest.approx(1 / (N - 1), rel=1e-10)
    assert _exact_loss(isometric, x, "ambient") == pytest.approx(1 / N, rel=1e-10)
    # any other map is strictly above the bound
    for seed in range(3):
        assert _exact_loss(Linear(M, N, seed=seed), x) > 1 / (N - 1) * 1.05
        assert _exact_loss(Tiny(seed=seed), x) > 1 / (N - 1) * 1.05


def test_minimum_is_one_over_m_when_h_is_smaller():
    """With m = dim H < n - 1, R has rank <= m: the loss is at least 1/m (not 1/(n-1)), reached by a map whose
    m non-zero eigenvalues are equal with one value for every x: here orthonormal rows W (scaled) at points
    in W's null space, where P W^T = W^T, so R = c^2 W^T W."""
    m = 3
    q, _ = torch.linalg.qr(torch.randn(N, N, dtype=DT, generator=torch.Generator().manual_seed(6)))
    w = q[:m]  # m orthonormal rows
    x = _points(5) @ q[m:].T @ q[m:]  # each point in the null space of w
    assert torch.allclose(x @ w.T, torch.zeros(5, m, dtype=DT), atol=1e-12)
    scaled = lambda y: 1.7 * y @ w.T  # noqa: E731
    for metric in ("stereographic", "ambient"):
        assert _exact_loss(scaled, x, metric) == pytest.approx(1 / m, rel=1e-10)
    # elsewhere, and for any other map into R^m, it is above 1/m, and never near 1/(n-1)
    y = _points(5, seed=7)
    assert _exact_loss(scaled, y) > 1 / m * 1.01
    for seed in range(3):
        for encoder in (Linear(m, N, seed=seed), Tiny(m=m, seed=seed)):
            assert _exact_loss(encoder, y) >= 1 / m * (1 - 1e-10)


def test_the_bound_needs_one_scale_for_every_sample():
    # e(x) = |x| x is, on each sphere's tangent space, an isometry scaled by |x|: Tr(R^2) = Tr(R)^2 / (n-1)
    # per sample, but the scale differs between samples, so the batch ratio stays above 1/(n-1).
    radial = lambda y: y.norm(dim=1, keepdim=True) * y  # noqa: E731
    same_radius = _points(5) / _points(5).norm(dim=1, keepdim=True) * 3.0
    assert _exact_loss(radial, same_radius) == pytest.approx(1 / (N - 1), rel=1e-10)
    mixed = same_radius * torch.tensor([[0.5], [1.0], [2.0], [3.0], [4.0]], dtype=DT)
    assert _exact_loss(radial, mixed) > 1.5 / (N - 1)


def test_terms_are_differentiable_wrt_parameters():
    encoder, x = Tiny(), _points(4)
    loss = isometry_loss(encoder, x, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, list(encoder.parameters()), allow_unused=True)
    # the last layer's bias only shifts h and never enters the Jacobian: no gradient is right there
    names = [name for name, _ in encoder.named_parameters()]
    for name, grad in zip(names, grads):
        if name == "net.2.bias":
            assert grad is None or torch.count_nonzero(grad) == 0
        else:
            assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_parameter_gradients_equal_double_backward_reference():
    encoder, x = Tiny(), _points(4)
    v = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    params = list(encoder.parameters())
    loss = isometry_loss(encoder, x, probes=v)
    ours = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    P = torch.eye(N, dtype=DT)[None] - x[:, :, None] * x[:, None, :] / x.pow(2).sum(1)[:, None, None]
    u = torch.einsum("bij,bj->bi", P, v)
    _, ju = torch.autograd.functional.jvp(encoder, x, u, create_graph=True)
    _, w = torch.autograd.functional.vjp(encoder, x, ju, create_graph=True)
    pw = torch.einsum("bij,bj->bi", P, w)
    ref_loss = pw.pow(2).sum(1).mean() / ju.pow(2).sum(1).mean() ** 2
    ref = torch.autograd.grad(ref_loss, params, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


# --- validation --------------------------------------------------------------------------------------


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ValueError, match="stereographic.*identity.*ambient"):
        isometry_terms(Tiny(), _points(2), metric="euclidean")


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="probes"):
        isometry_terms(Tiny(), _points(2), probes=torch.zeros(3, N, dtype=DT))
    with pytest.raises(ValueError, match=r"\(B, \.\.\.\)"):
        isometry_terms(Tiny(), torch.zeros(N, dtype=DT))
    with pytest.raises(ValueError, match="reduction"):
        isometry_ratio(torch.ones(3), torch.ones(3), reduction="mean")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        isometry_ratio(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="does not depend on x"):
        isometry_terms(lambda y: torch.zeros(y.shape[0], 2, dtype=DT), _points(2))
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        isometry_terms(Tiny(), _points(2))


def test_global_reduction_without_process_group_is_local():
    tr_r, tr_r2 = torch.rand(5) + 0.5, torch.rand(5)
    torch.testing.assert_close(isometry_ratio(tr_r, tr_r2, "global"), isometry_ratio(tr_r, tr_r2, "local"))
    torch.testing.assert_close(isometry_ratio(tr_r, tr_r2), tr_r2.mean() / tr_r.mean() ** 2)


_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from isosweep.core.geometry import isometry_terms, isometry_ratio
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    v = torch.randn(6, 6, generator=g, dtype=torch.float64)
    rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shards: global != mean of local ratios
    tr_r, tr_r2 = isometry_terms(enc, x[rows], probes=v[rows])
    loss = isometry_ratio(tr_r, tr_r2, reduction="global")
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in enc.parameters()]
    for gr in grads:  # what DDP does: average the parameter gradients
        dist.all_reduce(gr)
        gr /= world
    torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # starts two Python processes with a gloo process group (about 20 s here)
def test_global_reduction_under_two_ranks_matches_the_full_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", str(port), str(tmp_path / f"r{rank}.pt")], env=env)
        for rank in range(2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    results = [torch.load(tmp_path / f"r{rank}.pt") for rank in range(2)]

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    v = torch.randn(6, 6, generator=g, dtype=torch.float64)
    full = isometry_loss(enc, x, probes=v)
    full.backward()
    for res in results:
        torch.testing.assert_close(res["loss"], full.detach())
        for got, p in zip(res["grads"], enc.parameters()):
            torch.testing.assert_close(got, torch.zeros_like(p) if p.grad is None else p.grad)
    # and the per-rank ratio really is a different number here
    local0 = isometry_ratio(*isometry_terms(enc, x[:2], probes=v[:2]))
    assert not math.isclose(local0.item(), full.item(), rel_tol=1e-3)
