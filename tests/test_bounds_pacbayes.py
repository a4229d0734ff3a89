"""Bound arithmetic against independent computations (scipy root finding, torch.distributions,
brute-force minimisation, simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import rel_entr

from kfacbound.bounds import pacbayes as pb
from kfacbound.errors import KfacboundError

probs = st.floats(0.0, 1.0, allow_nan=False)
costs = st.floats(1e-9, 20.0, allow_nan=False)


def scipy_kl(q: float, p: float) -> float:
    return float(rel_entr(q, p) + rel_entr(1 - q, 1 - p))


def scipy_kl_inv(q: float, c: float) -> float:
    if c == 0:
        return q
    f = lambda p: scipy_kl(q, p) - c  # noqa: E731
    if f(1 - 1e-15) <= 0:
        return 1.0
    return brentq(f, q, 1 - 1e-15, xtol=1e-15, rtol=1e-15)


@given(probs, st.floats(1e-6, 1 - 1e-6))
def test_kl_matches_scipy(q, p):
    assert pb.kl_bernoulli(q, p) == pytest.approx(scipy_kl(q, p), rel=1e-9, abs=1e-12)


@settings(max_examples=200)
@given(probs, costs)
def test_kl_inv_inverts_and_is_upper_end(q, c):
    p = pb.kl_inv(q, c)
    assert q <= p <= 1.0
    ref = scipy_kl_inv(q, c)
    assert p >= ref - 1e-12  # never below the true inverse (up to float resolution)
    assert p <= ref + 2e-12
    if p < 1.0 - 1e-5:  # (closer to 1, a 1e-12 step in p moves kl by more than 1e-6)
        assert pb.kl_bernoulli(q, p) == pytest.approx(c, rel=1e-6, abs=1e-9)
    if p < 1.0:
        assert pb.kl_bernoulli(q, p) >= c * (1 - 1e-12)  # upper end of the bracket
        assert pb.kl_bernoulli(q, max(q, p - 2e-12)) <= c * (1 + 1e-12)


@given(probs, probs, costs)
def test_kl_inv_monotone_in_q(q1, q2, c):
    lo, hi = sorted((q1, q2))
    assert pb.kl_inv(lo, c) <= pb.kl_inv(hi, c) + 1e-12


@given(probs, costs, costs)
def test_kl_inv_monotone_in_c(q, c1, c2):
    lo, hi = sorted((c1, c2))
    assert pb.kl_inv(q, lo) <= pb.kl_inv(q, hi) + 1e-12


def test_kl_inv_edges():
    assert pb.kl_inv(0.3, 0.0) == 0.3
    assert pb.kl_inv(0.3, math.inf) == 1.0
    assert pb.kl_inv(1.0, 0.5) == 1.0
    # q = 0 has the closed form 1 − e^{−c}
    assert pb.kl_inv(0.0, 0.1) == pytest.approx(1 - math.exp(-0.1), abs=1e-12)
    assert pb.kl_inv(0.0, 0.1) >= 1 - math.exp(-0.1)
    with pytest.raises(KfacboundError):
        pb.kl_inv(0.5, -1.0)
    with pytest.raises(KfacboundError):
        pb.kl_inv(float("nan"), 1.0)


def test_grid_roundtrip_and_penalty():
    lam = pb.grid_lambda(137, 0.1, 100)
    assert pb.grid_j(lam) == pytest.approx(137)
    assert pb.grid_penalty(1) == pytest.approx(math.log(math.pi**2 / 6))
    assert pb.grid_penalty(5) == pytest.approx(2 * math.log(5) + math.log(math.pi**2 / 6))
    with pytest.raises(KfacboundError):
        pb.grid_penalty(0)
    # λ above c (j < 1) must round to j = 1, never to j ≤ 0
    assert pb.grid_candidates(0.5) == [1]
    assert pb.grid_candidates(pb.grid_lambda(10.4)) == [10, 11]
    # the prior weights sum to ≤ 1
    assert sum(6 / (math.pi**2 * j * j) for j in range(1, 100000)) < 1


@given(st.floats(0.0, 0.5), st.floats(0.0, 1e4), st.integers(100, 100000))
def test_formula_ordering(emp, kl, n):
    """Pinsker and the quadratic/λ relaxations are never tighter than the kl bound."""
    d = 0.025
    m = pb.maurer_bound(emp, kl, n, d)
    assert m >= emp
    assert pb.mcallester_bound(emp, kl, n, d) >= m - 1e-9
    assert pb.quadratic_bound(emp, kl, n, d) >= m - 1e-9
    assert pb.lambda_bound(emp, kl, n, d) >= m - 1e-9


def test_maurer_and_dr_explicit():
    emp, kl, n, d = 0.05, 2000.0, 60000, 0.025
    Bm = (kl + math.log(2 * math.sqrt(n) / d)) / n
    Bd = (kl + math.log(n / d)) / (n - 1)
    assert pb.maurer_bound(emp, kl, n, d) == pytest.approx(scipy_kl_inv(emp, Bm), abs=1e-11)
    assert pb.dr_bound(emp, kl, n, d) == pytest.approx(scipy_kl_inv(emp, Bd), abs=1e-11)
    pen = pb.grid_penalty(300)
    assert pb.complexity(kl, n, d, "maurer", pen) == pytest.approx(Bm + pen / n)


def test_lambda_bound_optimum_brute_force():
    emp, kl, n, d = 0.07, 1500.0, 20000, 0.025
    grid = np.linspace(1e-4, 2 - 1e-4, 200001)
    brute = min(pb.lambda_bound(emp, kl, n, d, lam=float(x)) for x in grid[::50])
    assert pb.lambda_bound(emp, kl, n, d) <= brute + 1e-9


def test_catoni_explicit():
    emp, kl, n, d = 0.05, 500.0, 10000, 0.05
    cs = (0.5, 1.0, 2.0)
    ref = min((1 - math.exp(-C * emp - (kl + math.log(3 / d)) / n)) / (1 - math.exp(-C))
              for C in cs)
    assert pb.catoni_bound(emp, kl, n, d, cs=cs) == pytest.approx(ref, rel=1e-12)


def _rand_orth(k, gen):
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    return q


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10**6), st.floats(1e-3, 10.0))
def test_gaussian_kl_matches_torch_and_rotation(k, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, generator=gen, dtype=torch.float64)
    w0 = torch.randn(k, generator=gen, dtype=torch.float64)
    s = torch.rand(k, generator=gen, dtype=torch.float64) * 2 + 0.05
    U = _rand_orth(k, gen)
    Q = torch.distributions.MultivariateNormal(mu, covariance_matrix=U @ torch.diag(s) @ U.T)
    P = torch.distributions.MultivariateNormal(w0, covariance_matrix=lam * torch.eye(
        k, dtype=torch.float64))
    ref = float(torch.distributions.kl_divergence(Q, P))
    ours = float(pb.kl_gaussian_isotropic(mu, s, w0, lam))
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-9)
    # another rotation of the same posterior spectrum: the same KL
    U2 = _rand_orth(k, gen)
    Q2 = torch.distributions.MultivariateNormal(mu, covariance_matrix=U2 @ torch.diag(s) @ U2.T)
    assert float(torch.distributions.kl_divergence(Q2, P)) == pytest.approx(ours, rel=1e-8,
                                                                            abs=1e-9)


def test_optimal_prior_variance_minimises_kl():
    gen = torch.Generator().manual_seed(0)
    mu, w0 = torch.randn(50, generator=gen).double(), torch.randn(50, generator=gen).double()
    s = torch.rand(50, generator=gen).double() + 0.1
    lam = pb.optimal_prior_variance(float(((mu - w0) ** 2).sum()), float(s.sum()), 50)
    base = float(pb.kl_gaussian_isotropic(mu, s, w0, lam))
    for f in (0.9, 1.1):
        assert float(pb.kl_gaussian_isotropic(mu, s, w0, lam * f)) > base


def test_mc_bound_coverage_by_simulation():
    """kl⁻¹(ê_N, ln(1/δ′)/N) falls below the true mean in at most ≈ δ′ of the runs."""
    rng = np.random.default_rng(0)
    p, N, dp, runs = 0.1, 400, 0.1, 3000
    errs = rng.binomial(N, p, size=runs) / N
    fails = sum(pb.mc_error_bound(float(e), N, dp) < p for e in errs)
    assert fails / runs <= dp  # Chernoff is conservative: expect far fewer
    assert fails / runs > 0.0 or dp < 0.2  # sanity: not vacuous at δ′ = 0.1


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 0.6), st.floats(1e-3, 0.5))
def test_kl_inverse_autograd_matches_finite_differences(q, B):
    from kfacbound.bounds.optimize import KLInverse

    qt = torch.tensor(q, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(B, dtype=torch.float64, requires_grad=True)
    p = KLInverse.apply(qt, bt)
    assume_p = float(p.detach())
    if assume_p > 1 - 1e-4:
        return
    p.backward()
    h = 1e-6
    dq = (scipy_kl_inv(q + h, B) - scipy_kl_inv(q - h, B)) / (2 * h)
    dB = (scipy_kl_inv(q, B + h) - scipy_kl_inv(q, B - h)) / (2 * h)
    assert float(qt.grad) == pytest.approx(dq, rel=1e-4, abs=1e-6)
    assert float(bt.grad) == pytest.approx(dB, rel=1e-4, abs=1e-6)
