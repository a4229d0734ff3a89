"""Curvature-aware prior: the closed-form Kronecker KL against dense float64 KLs."""

from __future__ import annotations

import pytest
import torch

from kfacbound.bounds.families import build_posterior
from kfacbound.bounds.kron_prior import KronPrior, kl_from_terms

from .test_posteriors import random_factors, small_mlp

D = torch.float64


def dense_kl(Q, P, lam, tau) -> float:
    """KL between the dense Gaussians, covariances built from their definitions."""
    total = 0.0
    for i, (path, layer) in enumerate(Q.layers()):
        V = torch.kron(layer.U_G.double(), layer.U_A.double())
        s2 = torch.exp(2 * layer.log_std.detach().double()).reshape(-1)
        h = getattr(P, f"h_{i}").reshape(-1)
        pi = 1.0 / lam + tau * h
        cov_q = V @ torch.diag(s2) @ V.T
        cov_p = V @ torch.diag(1.0 / pi) @ V.T
        q = torch.distributions.MultivariateNormal(layer.mean.detach().double().reshape(-1),
                                                   covariance_matrix=cov_q)
        p = torch.distributions.MultivariateNormal(P.center(path).double().reshape(-1),
                                                   covariance_matrix=cov_p)
        total += float(torch.distributions.kl_divergence(q, p))
    return total


@pytest.mark.parametrize("perturb", [0.0, 0.05])
@pytest.mark.parametrize("lam,tau", [(0.02, 1.0), (0.005, 0.125), (0.1, 0.0)])
def test_kron_prior_kl_matches_dense(perturb, lam, tau):
    gen = torch.Generator().manual_seed(11)
    model, prior_model = small_mlp(0, widths=(4,), d=3, out=2), small_mlp(1, widths=(4,), d=3,
                                                                          out=2)
    Q = build_posterior(model, "kfac", factors=random_factors(model, gen), std_init=0.1,
                        dtype=D)
    means, bases = {}, {}
    from kfacbound.curvature.layout import curvature_layers, layer_matrix

    pm = dict(curvature_layers(prior_model))
    with torch.no_grad():
        for path, layer in Q.layers():
            layer.U_G.add_(perturb * torch.randn(layer.U_G.shape, generator=gen, dtype=D))
            layer.U_A.add_(perturb * torch.randn(layer.U_A.shape, generator=gen, dtype=D))
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen, dtype=D))
            means[path] = layer_matrix(pm[path]).double()
            g = torch.rand(layer.out_dim, generator=gen, dtype=D)
            a = torch.rand(layer.in1, generator=gen, dtype=D)
            bases[path] = (layer.U_G, layer.U_A, g, a)
    P = KronPrior(means, bases, n_prior=50, lam=lam, tau=max(tau, 1e-300))
    terms = P.kl_terms(Q.layers(), lam=lam, tau=tau, dtype=D)
    kl = float(kl_from_terms(terms).detach())
    assert kl == pytest.approx(dense_kl(Q, P, lam, tau), rel=1e-9)


def test_curvature_prior_certificate_recomputes_and_starts_at_q_equals_p(monkeypatch):
    import json

    from torch.utils.data import TensorDataset

    from kfacbound.bounds import certify as cf
    from kfacbound.bounds import gather
    from kfacbound.bounds.kron_prior import TAU_GRID

    from .test_certify import data_factors, toy_data, toy_model, train

    monkeypatch.setattr(gather, "kfac_factors", data_factors)
    X, y = toy_data()
    _, init, model = toy_model()
    model = train(model, X, y)
    kw = dict(posterior="kfac", mc_passes=2, init_model=init, prior_split=0.5, prior_epochs=2,
              prior_kind="curvature", progress=False)
    start = cf.certify_checkpoint(model, TensorDataset(X, y), iterations=0, **kw)
    # Q = P before any step: every KL term cancels but the grid rounding of λ and τ
    assert start["kl_start"] == pytest.approx(0.0, abs=1e-6)
    cert = json.loads(json.dumps(cf.certify_checkpoint(model, TensorDataset(X, y),
                                                       iterations=40, **kw)))
    assert cert["kl_terms"]["prior"] == "kron" and cert["tau"] in TAU_GRID
    assert cert["prior"]["kind"] == "curvature"
    assert sum(r["kl"] for r in cert["kl_layers"]) == pytest.approx(cert["kl"], rel=1e-9)
    bad_layers = [dict(r) for r in cert["kl_layers"]]
    bad_layers[0]["pi_r2"] += 1.0
    with pytest.raises(Exception, match="sum to"):
        cf.recompute_certificate(dict(cert, kl_layers=bad_layers))
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    with pytest.raises(Exception, match="τ"):
        cf.recompute_certificate(dict(cert, tau=0.3))
    bad = dict(cert, kl_terms=dict(cert["kl_terms"], pi_r2=cert["kl_terms"]["pi_r2"] + 50))
    with pytest.raises(Exception, match="differs from its terms"):
        cf.recompute_certificate(bad)
    with pytest.raises(Exception, match="curvature prior needs"):
        cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=1,
                              init_model=init, prior_split=0.5, prior_kind="curvature",
                              progress=False)
