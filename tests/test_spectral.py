"""Lanczos, Hutchinson, SLQ, overlaps and spectrum metrics against dense NumPy linear algebra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kfacbound.curvature.exact import exact_ggn, exact_hessian
from kfacbound.curvature.operators import ggn_operator, hessian_operator
from kfacbound.curvature.spectral import (
    count_outliers,
    eigenspace_overlap,
    hutchinson_trace,
    lanczos,
    overlap_curve,
    slq,
    slq_density,
    spectrum_metrics,
    top_eigenpairs,
)
from kfacbound.errors import KfacboundError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a loaded machine (10-20x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sym(p, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((p, p)))[0]
    lam = rng.standard_normal(p) * spread
    return (Q * lam) @ Q.T, lam


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, X, y


@pytest.mark.parametrize("method", ["arpack", "lanczos"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_top_k_matches_dense_eigh_on_hessian_operator(which, method):
    model, X, y = _net()
    op = hessian_operator(model, X, y, "ce", batch_size=10)
    H = exact_hessian(model, X, y, "ce").numpy()
    evals, evecs = np.linalg.eigh(H)
    k = 5
    order = {"LA": np.argsort(-evals), "SA": np.argsort(evals),
             "LM": np.argsort(-np.abs(evals))}[which][:k]
    lam, V = top_eigenpairs(op, k, which, method=method)
    ref = evals[order]
    np.testing.assert_allclose(lam, np.sort(ref)[::-1], rtol=1e-8, atol=1e-10)
    # eigenvectors: the same subspace (overlap 1) and residual ‖Hv − λv‖ small
    assert eigenspace_overlap(V, evecs[:, order]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(H @ V, V * lam, atol=1e-8)


def test_top_eigenpairs_dense_inputs_and_errors():
    A, lam = _sym(12)
    for M in (A, torch.from_numpy(A)):
        vals, _ = top_eigenpairs(M, 3)
        np.testing.assert_allclose(vals, np.sort(lam)[::-1][:3], atol=1e-10)
        vals, _ = top_eigenpairs(M, 3, method="lanczos")
        np.testing.assert_allclose(vals, np.sort(lam)[::-1][:3], atol=1e-10)
    vals, V = top_eigenpairs(A, 12)  # k >= p - 1: dense path
    np.testing.assert_allclose(vals, np.sort(lam)[::-1], atol=1e-10)
    assert eigenspace_overlap(V, np.eye(12)) == pytest.approx(1.0)
    with pytest.raises(KfacboundError):
        top_eigenpairs(A, 0)
    with pytest.raises(KfacboundError):
        top_eigenpairs(np.ones((3, 4)), 1)


def test_unrestarted_lanczos_stops_on_its_residuals_in_the_operators_dtype():
    """float32 Hessian operator, tol 1e-4: every returned pair's residual ‖Hv − θv‖ (dense,
    float64) is within the stopping rule's tol·|θ| (plus float32 rounding), the eigenvalues are
    the dense top-k, and fewer products were used than the step cap."""
    model, X, y = _net()
    H = exact_hessian(model, X, y, "ce").numpy()
    ref = np.sort(np.linalg.eigvalsh(H))[::-1][:4]
    op = hessian_operator(model.float(), X.float(), y, "ce", dtype=np.float32)
    lam, V = top_eigenpairs(op, 4, tol=1e-4, method="lanczos")
    np.testing.assert_allclose(lam, ref, rtol=1e-3)
    V = V / np.linalg.norm(V, axis=0)
    resid = np.linalg.norm(H @ V - V * lam, axis=0)
    assert np.all(resid <= 1e-4 * np.abs(lam) + 1e-4)
    assert 4 <= op.num_products < H.shape[0]
    with pytest.raises(KfacboundError, match="method"):
        top_eigenpairs(op, 2, method="power")


def test_ggn_operator_top_k_matches_dense_ggn():
    model, X, y = _net()
    G = exact_ggn(model, X, y, "ce").numpy()
    evals = np.linalg.eigvalsh(G)
    assert evals.min() > -1e-12 * evals.max()  # PSD
    lam, _ = top_eigenpairs(ggn_operator(model, X, y, "ce"), 4)
    np.testing.assert_allclose(lam, evals[::-1][:4], rtol=1e-8)


def test_hutchinson_within_statistical_tolerance():
    A, lam = _sym(40, seed=3)
    A += 2 * np.eye(40)
    m = 4000
    est, se = hutchinson_trace(A, m, seed=5)
    # theory: Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²) for Rademacher z
    sd = math.sqrt(2 * ((A ** 2).sum() - (np.diag(A) ** 2).sum()) / m)
    assert abs(est - np.trace(A)) < 4 * sd
    assert se == pytest.approx(sd, rel=0.15)
    # a diagonal matrix is estimated exactly by Rademacher probes
    est, _ = hutchinson_trace(np.diag(np.arange(5.0)), 3)
    assert est == pytest.approx(10.0)


def test_lanczos_full_run_reproduces_the_spectrum():
    A, lam = _sym(15, seed=4)
    alpha, beta = lanczos(A, np.ones(15), 15)
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), np.sort(lam), atol=1e-9)


def test_slq_density_integrates_to_one_and_matches_moments():
    p = 60
    A, lam = _sym(p, seed=6, spread=2.0)
    nodes, weights = slq(A, num_probes=40, num_steps=12, seed=0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    grid, dens = slq_density(nodes, weights)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    # per probe, Gauss quadrature with m nodes is exact up to degree 2m − 1: recompute uᵀA^k u
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, size=p).astype(float) * 2 - 1
    u = z / np.linalg.norm(z)
    for k in range(0, 8):
        exact = u @ np.linalg.matrix_power(A, k) @ u
        assert (weights[0] * nodes[0] ** k).sum() == pytest.approx(exact, rel=1e-8, abs=1e-10)
    # averaged over probes: the moments of the normalised spectral density (1/p) Σ λ^k
    for k in (1, 2, 3, 4):
        est = (weights * nodes ** k).sum(axis=1)
        ref = (lam ** k).mean()
        assert abs(est.mean() - ref) < 5 * est.std(ddof=1) / math.sqrt(len(est)) + 1e-9
    # broadened density's mean equals the quadrature mean
    mean = np.trapezoid(grid * dens, grid)
    assert mean == pytest.approx((weights * nodes).sum(axis=1).mean(), abs=1e-3)


def test_slq_on_operator_top_node_approaches_top_eigenvalue():
    model, X, y = _net()
    op = hessian_operator(model, X, y, "ce")
    H = exact_hessian(model, X, y, "ce").numpy()
    nodes, weights = slq(op, num_probes=2, num_steps=40, seed=1)
    assert nodes.max() == pytest.approx(np.linalg.eigvalsh(H).max(), rel=1e-6)


def test_overlap_self_random_and_invariance():
    rng = np.random.default_rng(0)
    n, k = 60, 6
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    assert eigenspace_overlap(V, V) == pytest.approx(1.0)
    R = np.linalg.qr(rng.standard_normal((k, k)))[0]
    assert eigenspace_overlap(V, V @ R) == pytest.approx(1.0)  # rotation inside the subspace
    draws = [eigenspace_overlap(V, np.linalg.qr(rng.standard_normal((n, k)))[0])
             for _ in range(300)]
    assert np.mean(draws) == pytest.approx(k / n, rel=0.1)
    assert eigenspace_overlap(V, V[:, :2] * 3.0, orthonormalize=True) == pytest.approx(1.0)
    curve = overlap_curve(V, V[:, ::-1])
    assert curve[k] == pytest.approx(1.0) and curve[1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(KfacboundError):
        eigenspace_overlap(V, np.eye(5))


def test_spectrum_metrics_by_hand():
    lam = np.array([4.0, 2.0, 1.0, 1.0, 0.0, -0.5, -1.5])
    m = spectrum_metrics(lam)
    pos = np.array([4.0, 2.0, 1.0, 1.0])
    pi = pos / 8.0
    assert m["top"] == 4.0 and m["trace"] == pytest.approx(6.0)
    assert m["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in pi)))
    assert m["stable_rank"] == pytest.approx(2.0)
    assert m["condition_number"] == pytest.approx(4.0)
    assert m["negative_mass"] == pytest.approx(2.0 / 10.0)
    assert m["negative_fraction"] == pytest.approx(2 / 7)
    assert m["num_positive"] == 4 and m["num_negative"] == 2


def test_outlier_rule():
    rng = np.random.default_rng(0)
    bulk = np.abs(rng.standard_normal(500)) * 0.1
    spikes = np.array([50.0, 30.0, 20.0, 12.0])
    assert count_outliers(np.concatenate([bulk, spikes])) == 4
    assert count_outliers(1.0 / np.arange(1, 200)) == 0  # smooth decay: no outliers
    assert count_outliers(np.array([-1.0, 0.0])) == 0
    assert spectrum_metrics(np.concatenate([bulk, spikes]))["outliers"] == 4
