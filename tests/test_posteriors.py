"""Posteriors: KL against dense torch.distributions Gaussians, sampling laws against explicit
weight sampling, BatchNorm folding, basis updates, std initialisation. (Mean forward, vanishing
noise, per-example conv kernels and the KL on every shared reference case: see
tests/test_posteriors_graph.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfacbound.bounds.families import build_posterior
from kfacbound.bounds.posteriors import (
    DiagLayer,
    ExactLayer,
    KronEigenLayer,
    exact_eigenbasis,
)
from kfacbound.bounds.prior import build_prior
from kfacbound.curvature.layout import curvature_layers, layer_matrix
from kfacbound.errors import KfacboundError, UnsupportedModuleError
from kfacbound.models import build_model, resolve_spec

D = torch.float64


def small_mlp(seed=0, bn=False, widths=(5,), d=4, out=3):
    spec = resolve_spec({"arch": "fc", "widths": list(widths), "bn": bn}, input_shape=[d],
                        num_outputs=out)
    return build_model(spec, seed=seed)


def psd(k, gen):
    M = torch.randn(k, k, generator=gen, dtype=D)
    return M @ M.T / k + 0.1 * torch.eye(k, dtype=D)


def random_factors(model, gen):
    return {p: (psd(m.weight.shape[0], gen), psd(layer_matrix(m).shape[1], gen))
            for p, m in curvature_layers(model)}


def random_eigenbases(model, gen, k=None):
    out = {}
    for p, m in curvature_layers(model):
        P = layer_matrix(m).numel()
        out[p] = exact_eigenbasis(psd(P, gen), k)
    return out


def dense_cov(layer) -> torch.Tensor:
    """The layer's covariance over vec(W̃) (row-major), built densely from its definition."""
    if isinstance(layer, DiagLayer):
        return torch.diag(torch.exp(2 * layer.log_std.detach().double()).reshape(-1))
    if isinstance(layer, KronEigenLayer):
        U = torch.kron(layer.U_G.double(), layer.U_A.double())  # (U_G ⊗ U_A) vec(Z) row-major
        s2 = torch.exp(2 * layer.log_std.detach().double()).reshape(-1)
        return U @ torch.diag(s2) @ U.T
    U = layer.U.double()
    s2 = torch.exp(2 * layer.log_std.detach().double())
    P = layer.numel()
    proj = torch.eye(P, dtype=D) - U @ U.T
    return U @ torch.diag(s2) @ U.T + float(torch.exp(2 * layer.log_std_perp.detach()[0])) * proj


def explicit_network_outputs(Q, x, num: int, seed: int) -> torch.Tensor:
    """Outputs at ``x`` of ``num`` networks drawn weight by weight (a flat MLP posterior):
    W̃ = M + one draw of the layer's noise, then the plain forward."""
    ref = []
    torch.manual_seed(seed)
    for _ in range(num):
        h = x
        for name in Q.names:
            blk = Q.blocks[name]
            if name in Q.layer_paths:
                W = blk.mean + blk.sample_noise(1)[0]
                h = F.linear(h, W[:, :-1], W[:, -1])
            else:
                h = blk(h)
        ref.append(float(h))
    return torch.tensor(ref, dtype=D)


def build(kind, model, gen, **kw):
    return build_posterior(model, kind, factors=random_factors(model, gen),
                           eigenbases=random_eigenbases(model, gen, kw.pop("k", None)),
                           dtype=D, **kw)


@pytest.mark.parametrize("kind,k", [("diag", None), ("kfac", None), ("exact", None),
                                    ("exact", 4)])
def test_kl_matches_dense_torch_distributions(kind, k):
    gen = torch.Generator().manual_seed(1)
    model, init = small_mlp(0), small_mlp(1)
    Q = build(kind, model, gen, k=k, std_init=0.05)
    with torch.no_grad():  # make the variances non-uniform
        for _, layer in Q.layers():
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen, dtype=D))
    P = build_prior(Q, init, lam=0.02)
    ref = 0.0
    for path, layer in Q.layers():
        mu = layer.mean.detach().reshape(-1)
        w0 = P.center(path).reshape(-1).double()
        q = torch.distributions.MultivariateNormal(mu, covariance_matrix=dense_cov(layer))
        p = torch.distributions.MultivariateNormal(
            w0, covariance_matrix=0.02 * torch.eye(len(mu), dtype=D))
        ref += float(torch.distributions.kl_divergence(q, p))
    assert float(Q.kl(P, dtype=D)) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kind,k", [("diag", None), ("kfac", None), ("exact", 3)])
def test_weight_samples_have_the_stated_covariance(kind, k):
    gen = torch.Generator().manual_seed(2)
    model = small_mlp(0, widths=(3,), d=2, out=2)
    Q = build(kind, model, gen, k=k, std_init=0.3)
    layer = Q.blocks["fc1"]
    torch.manual_seed(0)
    noise = layer.sample_noise(100000).reshape(100000, -1)
    emp = noise.T @ noise / len(noise)
    assert torch.allclose(emp, dense_cov(layer), atol=0.01)


@pytest.mark.parametrize("kind,k", [("diag", None), ("kfac", None), ("exact", 3)])
def test_local_reparameterisation_law(kind, k):
    """Cov(z | ã) from the local reparameterisation = (I ⊗ ãᵀ) Σ (I ⊗ ã)."""
    gen = torch.Generator().manual_seed(3)
    model = small_mlp(0, widths=(3,), d=2, out=2)
    Q = build(kind, model, gen, k=k, std_init=0.3)
    layer = Q.blocks["fc1"]
    a1 = torch.tensor([0.7, -1.2, 1.0], dtype=D)
    torch.manual_seed(1)
    z = layer.linear_noise(a1.expand(200000, 3))
    emp = z.T @ z / len(z)
    J = torch.kron(torch.eye(layer.out_dim, dtype=D), a1.reshape(1, -1))  # z = J vec(W̃)
    assert torch.allclose(emp, J @ dense_cov(layer) @ J.T, atol=0.01, rtol=0.02)
    assert z.mean(0).abs().max() < 0.01


def test_network_samples_are_per_example_independent():
    """Rows of one batch get independent networks: outputs of identical inputs are i.i.d.

    Compared with explicit networks sampled weight by weight (a different code path)."""
    gen = torch.Generator().manual_seed(4)
    model = small_mlp(0, widths=(4,), d=3, out=1)
    Q = build("kfac", model, gen, std_init=0.4)
    x = torch.randn(1, 3, dtype=D)
    torch.manual_seed(5)
    out = Q(x.expand(40000, 3)).reshape(-1)
    # explicit: draw full weights per network
    ref = explicit_network_outputs(Q, x, 2000, seed=6)
    assert float(out.mean()) == pytest.approx(float(ref.mean()), abs=4 * float(ref.std()) / 44)
    assert float(out.std()) == pytest.approx(float(ref.std()), rel=0.06)
    # independence: consecutive rows uncorrelated
    r = torch.corrcoef(torch.stack([out[:-1:2], out[1::2]]))[0, 1]
    assert abs(float(r)) < 0.03


def test_batchnorm_is_folded_and_prior_is_folded_init():
    model = small_mlp(0, bn=True).double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.weight.uniform_(0.5, 1.5)
    model.eval()
    init = small_mlp(0, bn=True).double()
    Q = build_posterior(model, "diag", std_init=1e-12, dtype=D)
    x = torch.randn(6, 4, dtype=D)
    assert torch.allclose(Q(x, sample=False), model(x), atol=1e-10)
    P = build_prior(Q, init, lam=0.01)
    # fresh BN (γ=1, β=0, μ=0, σ²=1) folds to a scaling by 1/√(1+ε)
    s = 1 / math.sqrt(1 + init.bn1.eps)
    assert torch.allclose(P.center("fc1")[:, :-1], init.fc1.weight.double() * s)
    assert "bn1" not in Q.names


def test_std_inits():
    gen = torch.Generator().manual_seed(7)
    model = small_mlp(0).double()
    factors = random_factors(model, gen)
    Q = build_posterior(model, "kfac", factors=factors, std_init="dr", std_min=1e-9,
                        prior_var=10.0, dtype=D)
    lay = Q.blocks["fc1"]
    rot = lay.U_G.T @ lay.mean.detach() @ lay.U_A
    assert torch.allclose(torch.exp(lay.log_std), rot.abs().clamp(min=1e-9), rtol=1e-10)
    Q = build_posterior(model, "kfac", factors=factors, std_init="curvature", n=1000,
                        prior_var=0.01, dtype=D)
    lay = Q.blocks["fc1"]
    G, A = factors["fc1"]
    eg, ea = torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A)
    want = torch.sort((1 / (1000 * torch.outer(eg, ea) + 100)).reshape(-1)).values
    got = torch.sort(torch.exp(2 * lay.log_std.detach()).reshape(-1)).values
    assert torch.allclose(got, want, rtol=1e-8)
    Qd = build_posterior(model, "diag", std_init="dr", std_scale=0.5, prior_var=10.0, dtype=D)
    assert torch.allclose(torch.exp(Qd.blocks["out"].log_std),
                          (0.5 * layer_matrix(model.out).abs()).clamp(min=1e-6), rtol=1e-10)


def test_update_basis_keeps_trace_and_does_not_raise_kl():
    gen = torch.Generator().manual_seed(8)
    model, init = small_mlp(0), small_mlp(1)
    Q = build("kfac", model, gen, std_init="dr")
    P = build_prior(Q, init, lam=0.01)
    lay = Q.blocks["fc1"]
    tr0, _ = lay.var_stats()
    kl0 = float(Q.kl(P, dtype=D))
    # same basis: nothing changes
    G = lay.U_G @ torch.diag(lay.eig_G) @ lay.U_G.T
    A = lay.U_A @ torch.diag(lay.eig_A) @ lay.U_A.T
    before = lay.log_std.detach().clone()
    lay.update_basis(G, A)
    assert torch.allclose(lay.log_std.detach(), before, atol=1e-8)
    new = random_factors(model, gen)["fc1"]
    lay.update_basis(*new)
    tr1, _ = lay.var_stats()
    assert float(tr1) == pytest.approx(float(tr0), rel=1e-9)
    assert float(Q.kl(P, dtype=D)) <= kl0 + 1e-9


def test_prior_defaults_and_errors():
    model = small_mlp(0)
    Q = build_posterior(model, "diag", std_init=0.01)
    with pytest.warns(UserWarning, match="zero-centred"):
        P = build_prior(Q, None)
    assert P.center("fc1") is None
    assert float(P.lam) <= 0.1 * math.exp(-0.01) + 1e-9
    with pytest.raises(KfacboundError):
        build_prior(Q, small_mlp(0, widths=(6,)))
    with pytest.raises(KfacboundError):
        build_posterior(model, "kfac")
    with pytest.raises(KfacboundError):
        build_posterior(model, "nope")
    with pytest.raises(UnsupportedModuleError):
        build_posterior(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "diag", std_init=0.1)


def test_exact_layer_rejects_wrong_basis():
    model = small_mlp(0)
    with pytest.raises(KfacboundError):
        ExactLayer(model.fc1, torch.eye(3, dtype=D), torch.ones(3, dtype=D), 0.1, 1, 0.1)


@pytest.mark.parametrize("kind,k", [("diag", None), ("kfac", None), ("exact", 3)])
def test_samplers_use_the_same_clamped_stds_as_the_kl(kind, k):
    """A log-std below the floor must not make the sampled Q narrower than the Q of the KL."""
    from kfacbound.bounds.posteriors import _LOG_STD_MIN

    gen = torch.Generator().manual_seed(5)
    model = small_mlp(0, widths=(3,), d=2, out=2)
    Q = build(kind, model, gen, k=k, std_init=0.3)
    layer = Q.blocks["fc1"]
    with torch.no_grad():
        layer.log_std.fill_(_LOG_STD_MIN - 10.0)
        if hasattr(layer, "log_std_perp"):
            layer.log_std_perp.fill_(_LOG_STD_MIN - 10.0)
    _, sum_log_var = layer.var_stats(D)
    assert float(sum_log_var) == pytest.approx(2 * _LOG_STD_MIN * layer.numel())
    torch.manual_seed(0)
    noise = layer.sample_noise(20000).reshape(20000, -1)
    expected = math.exp(_LOG_STD_MIN)
    assert float(noise.std(0).max()) == pytest.approx(expected, rel=0.05)
    a = torch.randn(20000, layer.in1, dtype=D, generator=gen)
    z_std = layer.linear_noise(a).std(0) if kind != "exact" else None
    if z_std is not None:  # local reparameterisation: std of z_o = floor · ‖ã‖ (all stds equal)
        ref = expected * float(a.pow(2).sum(1).sqrt().mean())
        assert float(z_std.max()) < 2 * ref


def test_certify_refuses_standardized_data():
    from kfacbound.bounds.certify import certify_checkpoint
    from kfacbound.data import load_dataset
    from kfacbound.errors import KfacboundError

    ds = load_dataset("gaussian", n=50, input_dim=4, classes=3, standardize=True)
    model, init = small_mlp(0), small_mlp(1)
    with pytest.raises(KfacboundError, match="standardize"):
        certify_checkpoint(model.float(), ds, iterations=1, mc_passes=1, init_model=init.float(),
                           progress=False)


@pytest.mark.parametrize("kind", ["diag", "kfac", "exact"])
def test_repeated_draws_have_the_law_of_independent_networks(kind):
    """forward_repeated (first layer's moments shared across passes) against explicit networks
    sampled weight by weight: same output law, and passes / examples uncorrelated."""
    gen = torch.Generator().manual_seed(7)
    model = small_mlp(0, widths=(4,), d=3, out=1)
    Q = build(kind, model, gen, std_init=0.4, k=None)
    x = torch.randn(1, 3, dtype=D)
    torch.manual_seed(8)
    out = Q.forward_repeated(x.expand(200, 3), 200)  # 200 passes × 200 copies of x
    assert out.shape == (200, 200, 1)
    flat = out.reshape(-1)
    ref = explicit_network_outputs(Q, x, 3000, seed=9)
    assert float(flat.mean()) == pytest.approx(float(ref.mean()), abs=4 * float(ref.std()) / 54)
    assert float(flat.std()) == pytest.approx(float(ref.std()), rel=0.06)
    o = out[..., 0]
    r_pass = torch.corrcoef(torch.stack([o[0::2].reshape(-1), o[1::2].reshape(-1)]))[0, 1]
    r_ex = torch.corrcoef(torch.stack([o[:, 0::2].reshape(-1), o[:, 1::2].reshape(-1)]))[0, 1]
    assert abs(float(r_pass)) < 0.03 and abs(float(r_ex)) < 0.03


def test_cached_first_layer_statistics_give_the_same_draws_and_training():
    """forward_cached with first_noise_inputs (U_Aᵀã)², computed once, against forward: the
    same outputs under the same RNG state (the first layer's statistics computed here by hand,
    densely), and optimize_posterior with and without the cache ends at the same posterior."""
    from kfacbound.bounds.optimize import optimize_posterior

    gen = torch.Generator().manual_seed(5)
    model = small_mlp(0, widths=(6, 4), d=5, out=3)
    Q = build("kfac", model, gen, std_init=0.2)
    x = torch.randn(50, 5, generator=gen, dtype=D)
    r = Q.first_noise_inputs(x, chunk=7)
    U_A = Q.blocks["fc1"].U_A
    a1 = torch.cat([x, torch.ones(50, 1, dtype=D)], 1)
    torch.testing.assert_close(r, (a1 @ U_A) ** 2)
    torch.manual_seed(3)
    ref = Q(x, sample=True, per_example=True)
    torch.manual_seed(3)
    got = Q.forward_cached(x, r)
    torch.testing.assert_close(got, ref)
    # the diagonal posterior has nothing worth caching
    assert build("diag", model, gen).first_noise_inputs(x) is None
    # training: same parameters after a few steps
    y = torch.randint(0, 3, (50,), generator=gen)
    runs = []
    for cache in (False, True):
        Qc = build("kfac", model, torch.Generator().manual_seed(5), std_init=0.2)
        P = build_prior(Qc, model)
        optimize_posterior(Qc, P, x, y, iterations=5, batch_size=16, lr=1e-2, progress=False,
                           cache_first_layer=cache)
        runs.append([p.detach().clone() for p in Qc.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)
