"""Certificate validity (issue 15): selection among runs pays for itself, recompute_certificate
rejects inconsistent certificates, the certified KL is the KL of the Gaussian actually sampled.

References are independent: dense float64 torch.distributions KLs, the bound formulas written out
with scipy's brentq in tests/test_certify.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from kfacbound.bounds import certify as cf
from kfacbound.bounds import gather
from kfacbound.bounds.certify import certify_best
from kfacbound.bounds.families import build_posterior
from kfacbound.bounds.posteriors import ExactLayer, KronEigenLayer
from kfacbound.bounds.prior import build_prior
from kfacbound.bounds.select import Selection
from kfacbound.errors import KfacboundError

from .test_certify import brentq_kl_inv, data_factors
from .test_posteriors import dense_cov, psd, random_eigenbases, random_factors, small_mlp

D = torch.float64


def independent_bound(d: dict, delta: float, delta_prime: float) -> float:
    """The bound from the JSON at the given budgets, formulas written out here (Maurer form)."""
    n, N = d["n"], d["mc_samples"]
    ub = brentq_kl_inv(d["mc_errors"] / N, math.log(1 / delta_prime) / N)
    pen = 2 * math.log(d["j"]) + math.log(math.pi**2 / 6)
    B = (d["kl"] + pen + math.log(2 * math.sqrt(n) / delta)) / n
    return brentq_kl_inv(ub, B)


def dense_kl(Q, P) -> float:
    ref = 0.0
    for path, layer in Q.layers():
        mu = layer.mean.detach().reshape(-1).double()
        w0 = P.center(path).reshape(-1).double()
        q = torch.distributions.MultivariateNormal(mu, covariance_matrix=dense_cov(layer))
        p = torch.distributions.MultivariateNormal(
            w0, covariance_matrix=float(P.lam.detach()) * torch.eye(len(mu), dtype=D))
        ref += float(torch.distributions.kl_divergence(q, p))
    return ref


# ----------------------------------------------------------------------------- sampled = certified


def _random_kron_posterior(seed: int):
    """(generator, w0 model, a float32 K-FAC posterior on random factors) for a small MLP."""
    gen = torch.Generator().manual_seed(seed)
    model, init = small_mlp(0), small_mlp(1)
    Q = build_posterior(model, "kfac", factors=random_factors(model, gen), std_init=0.05,
                        dtype=torch.float32)
    return gen, init, Q


def test_kron_kl_is_the_kl_of_the_sampled_gaussian_for_non_orthogonal_bases():
    """float32 bases are orthogonal only to rounding; the KL must be that of the Gaussian whose
    covariance (Ũ_G ⊗ Ũ_A) D (Ũ_G ⊗ Ũ_A)ᵀ is sampled. Exaggerate the rounding (a 5 %
    perturbation) so that the orthogonal-basis formula would be visibly wrong."""
    gen, init, Q = _random_kron_posterior(4)
    with torch.no_grad():
        for _, layer in Q.layers():
            assert isinstance(layer, KronEigenLayer) and layer.U_G.dtype == torch.float32
            layer.U_G.add_(0.05 * torch.randn(layer.U_G.shape, generator=gen))
            layer.U_A.add_(0.05 * torch.randn(layer.U_A.shape, generator=gen))
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen))
            layer._basis_stats()
    P = build_prior(Q, init, lam=0.02)
    ref = dense_kl(Q, P)
    assert float(Q.kl(P, dtype=D)) == pytest.approx(ref, rel=1e-9)
    # the orthogonal-basis formula (Σ S², Σ ln S²) is off: the test can fail
    naive = 0.0
    for path, layer in Q.layers():
        ls = layer.log_std.detach().double()
        diff = layer.mean.detach().double() - P.center(path).double()
        naive += 0.5 * ((torch.exp(2 * ls).sum() + (diff**2).sum()) / 0.02 - ls.numel()
                        + ls.numel() * math.log(0.02) - 2 * ls.sum())
    assert abs(float(naive) - ref) > 1e-3


def test_kron_sampling_follows_the_stored_bases():
    """Empirical covariance of the sampled weights = the dense covariance used in the KL."""
    gen = torch.Generator().manual_seed(5)
    model = small_mlp(0, widths=(3,), d=2, out=2)
    Q = build_posterior(model, "kfac", factors=random_factors(model, gen), std_init=0.3,
                        dtype=torch.float32)
    layer = Q.blocks["fc1"]
    with torch.no_grad():
        layer.U_G.add_(0.1 * torch.randn(layer.U_G.shape, generator=gen))
        layer._basis_stats()
    torch.manual_seed(0)
    noise = layer.sample_noise(200000).reshape(200000, -1).double()
    emp = noise.T @ noise / len(noise)
    assert torch.allclose(emp, dense_cov(layer), atol=0.01)


def test_exact_posterior_keeps_and_samples_its_basis_in_float64():
    gen = torch.Generator().manual_seed(6)
    model, init = small_mlp(0), small_mlp(1)
    Q = build_posterior(model, "exact", eigenbases=random_eigenbases(model, gen, 4),
                        std_init=0.05, dtype=torch.float32)
    for _, layer in Q.layers():
        assert isinstance(layer, ExactLayer) and layer.U.dtype == torch.float64
        assert layer.sample_noise(3).dtype == torch.float32
    P = build_prior(Q, init, lam=0.02)
    assert float(Q.kl(P, dtype=D)) == pytest.approx(dense_kl(Q, P), rel=1e-7)


# ----------------------------------------------------------------------------- selection


def test_selection_budgets():
    assert Selection(4, shared_prior=True).budgets(0.025, 0.01) == (0.025, 0.0025)
    assert Selection(4, shared_prior=False).budgets(0.025, 0.01) == (0.025 / 4, 0.0025)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(KfacboundError):
            Selection(bad, shared_prior=True)


def test_selection_over_posteriors_pays_delta_prime_over_m(trained, monkeypatch):
    X, y, init, model = trained
    monkeypatch.setattr(gather, "kfac_factors", data_factors)
    cands = [{"posterior": "diag"}, {"posterior": "kfac"}, {"posterior": "diag", "lr": 3e-3}]
    cert = certify_best(model, TensorDataset(X, y), cands, iterations=60, mc_passes=2,
                        init_model=init, progress=False)
    cert = json.loads(json.dumps(cert))
    sel = cert["selection"]
    assert sel["m"] == 3 and sel["shared_prior"] is True
    assert sel["delta_prime_each"] == pytest.approx(0.01 / 3)
    assert sel["delta_each"] == pytest.approx(0.025)
    assert cert["confidence"] == pytest.approx(1 - 0.025 - 0.01)
    assert cert["bound"] == min(c["bound"] for c in sel["candidates"])
    assert cert["bound"] == pytest.approx(independent_bound(cert, 0.025, 0.01 / 3), abs=1e-9)
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    # the same numbers without the selection's price give a smaller (invalid) bound
    unpaid = dict(cert, selection=None)
    assert cf.recompute_certificate(unpaid) < cert["bound"]
    # m is part of the certificate: claiming fewer candidates is caught
    with pytest.raises(KfacboundError, match="selection"):
        cf.recompute_certificate(dict(cert, selection=dict(sel, m=1)))


def test_selection_with_data_dependent_priors_also_splits_delta(trained):
    X, y, init, model = trained
    cands = [{"prior_split": 0.3}, {"prior_split": 0.5}]
    cert = certify_best(model, TensorDataset(X, y), cands, iterations=20, mc_passes=1,
                        init_model=init, progress=False)
    sel = cert["selection"]
    assert sel["shared_prior"] is False
    assert sel["delta_each"] == pytest.approx(0.025 / 2)
    d = json.loads(json.dumps(cert))
    assert d["bound"] == pytest.approx(independent_bound(d, 0.025 / 2, 0.01 / 2), abs=1e-9)
    assert cf.recompute_certificate(d) == pytest.approx(d["bound"], abs=1e-12)


# ----------------------------------------------------------------------------- recompute checks


def test_recompute_rejects_wrong_k_n_j_and_confidence(trained):
    X, y, init, model = trained
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=5,
                                 mc_passes=1, init_model=init, progress=False)
    cert = json.loads(json.dumps(cert))
    assert cert["dataset"]["size"] == len(X)
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    with pytest.raises(KfacboundError, match="parameters"):
        cf.recompute_certificate(dict(cert, num_params=cert["num_params"] + 1))
    with pytest.raises(KfacboundError, match="training-set size"):
        cf.recompute_certificate(dict(cert, dataset=dict(cert["dataset"], size=len(X) + 1)))
    with pytest.raises(KfacboundError, match="integer"):
        cf.recompute_certificate(dict(cert, j=cert["j"] + 0.5))
    with pytest.raises(KfacboundError, match="confidence"):
        cf.recompute_certificate(dict(cert, confidence=0.99))


def test_recompute_checks_n_plus_prior_n(trained):
    X, y, init, model = trained
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=5,
                                 mc_passes=1, init_model=init, prior_split=0.25, progress=False)
    cert = json.loads(json.dumps(cert))
    assert cert["n"] + cert["prior"]["prior_n"] == cert["dataset"]["size"] == len(X)
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    # a bound that claims the whole training set as n while a prior saw part of it
    bad = dict(cert, n=len(X), mc_samples=len(X), mc_errors=cert["mc_errors"])
    bad["mc_error"] = bad["mc_errors"] / bad["mc_samples"]
    with pytest.raises(KfacboundError, match="training-set size"):
        cf.recompute_certificate(bad)


def test_psd_helper_is_positive_definite():  # guards the helpers imported above
    g = torch.Generator().manual_seed(0)
    assert torch.linalg.eigvalsh(psd(5, g)).min() > 0


# ----------------------------------------------------------------------------- learnt priors


def test_pbb_scheme_starts_q_at_the_prior_mean_and_certifies_on_the_bound_split(trained):
    X, y, init, model = trained
    kw = dict(posterior="diag", iterations=0, mc_passes=1, init_model=init, prior_split=0.4,
              prior_epochs=2, progress=False)
    pbb = json.loads(json.dumps(cf.certify_checkpoint(model, TensorDataset(X, y), **kw)))
    ckpt = cf.certify_checkpoint(model, TensorDataset(X, y), prior_scheme="checkpoint", **kw)
    # μ = the prior mean before any step: ‖μ − w_p‖² is exactly 0; from the checkpoint it is not
    assert pbb["kl_terms"]["sq_dist"] == 0.0
    assert ckpt["kl_terms"]["sq_dist"] > 0.0
    assert pbb["n"] == len(X) - round(0.4 * len(X)) == pbb["mc_samples"]
    assert pbb["prior"]["prior_n"] == round(0.4 * len(X))
    assert pbb["prior"]["prior_indices_sha256"] != pbb["prior"]["bound_indices_sha256"]
    data = pbb["prior"]["data"]
    assert "prior split only" in data["prior_mean"]
    assert data["posterior_and_curvature"].startswith("all training data")
    assert data["monte_carlo_and_n"] == f"bound split ({pbb['n']} examples)"
    assert ckpt["prior"]["data"]["posterior_and_curvature"] == "bound split"
    assert cf.recompute_certificate(pbb) == pytest.approx(pbb["bound"], abs=1e-12)


def test_learnt_prior_certificate_after_training_recomputes(trained):
    X, y, init, model = trained
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=30,
                                 mc_passes=2, init_model=init, prior_split=0.5, prior_epochs=3,
                                 progress=False)
    d = json.loads(json.dumps(cert))
    assert d["bound"] == pytest.approx(independent_bound(d, 0.025, 0.01), abs=1e-9)
    assert cf.recompute_certificate(d) == pytest.approx(d["bound"], abs=1e-12)


def test_a_prior_that_saw_the_bound_split_is_refused(trained, monkeypatch):
    import kfacbound.data as data_mod

    X, y, init, model = trained
    real = data_mod.split_indices

    def leaky(n, fraction, seed=0):
        first, rest = real(n, fraction, seed)
        return torch.cat([first, rest[:5]]), rest  # 5 bound examples also train the prior

    monkeypatch.setattr(data_mod, "split_indices", leaky)
    with pytest.raises(KfacboundError, match="share 5 examples"):
        cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=1,
                              mc_passes=1, init_model=init, prior_split=0.5, progress=False)
    with pytest.raises(KfacboundError, match="partition"):
        cf.check_disjoint(torch.arange(3), torch.arange(4, 10), 10)


def test_selection_over_formulas_or_per_candidate_deltas_does_not_share(trained):
    from kfacbound.bounds.select import shares_prior

    assert not shares_prior({}, [{"formula": "maurer"}, {"formula": "dr"}])
    X, y, init, model = trained
    with pytest.raises(KfacboundError, match="total budget"):
        certify_best(model, TensorDataset(X, y), [{"delta": 0.1}, {}], iterations=1,
                     init_model=init, progress=False)
    fake = {"selection": {"m": 2, "shared_prior": True, "rule": "union",
                          "candidates": [{"options": {"formula": "dr"}}, {"options": {}}]}}
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=2,
                                 mc_passes=1, init_model=init, progress=False)
    with pytest.raises(KfacboundError, match="shared prior"):
        cf.recompute_certificate(dict(json.loads(json.dumps(cert)), **fake))


# ----------------------------------------------------------------------------- per-layer KL


def test_per_layer_kl_matches_dense_kl_of_each_layer():
    """kl_layers (the BatchNorm study's breakdown) against a dense float64 KL per layer."""
    gen, init, Q = _random_kron_posterior(7)
    with torch.no_grad():
        for _, layer in Q.layers():
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen))
    P = build_prior(Q, init, lam=0.02)
    rows = cf.layer_kl_terms(Q, P, lam=0.02)
    assert [r["layer"] for r in rows] == [p for p, _ in Q.layers()]
    for (path, layer), row in zip(Q.layers(), rows, strict=True):
        mu = layer.mean.detach().reshape(-1).double()
        q = torch.distributions.MultivariateNormal(mu, covariance_matrix=dense_cov(layer))
        p = torch.distributions.MultivariateNormal(
            P.center(path).reshape(-1).double(),
            covariance_matrix=0.02 * torch.eye(len(mu), dtype=D))
        assert row["kl"] == pytest.approx(float(torch.distributions.kl_divergence(q, p)), rel=1e-8)
    assert sum(r["kl"] for r in rows) == pytest.approx(dense_kl(Q, P), rel=1e-8)


def test_kl_anatomy_against_dense_kl_and_a_brute_force_layer_variance():
    """kl_anatomy's parts against the dense float64 KL and the distance computed from the means;
    its per-layer-λ KL against a brute-force minimisation of each layer's dense KL over λ."""
    from scipy.optimize import minimize_scalar

    from kfacbound.bounds import kl_anatomy

    gen, init, Q = _random_kron_posterior(11)
    with torch.no_grad():
        for _, layer in Q.layers():
            layer.log_std.add_(0.5 * torch.randn(layer.log_std.shape, generator=gen))
            layer.mean.add_(0.2 * torch.randn(layer.mean.shape, generator=gen))
    lam = 0.03
    P = build_prior(Q, init, lam=lam)
    cert = {"lambda": lam, "tau": None, "kl_layers": cf.layer_kl_terms(Q, P, lam=lam)}
    a = kl_anatomy(cert)
    assert a["kl"] == pytest.approx(dense_kl(Q, P), rel=1e-8)
    dist, best = 0.0, 0.0
    for path, layer in Q.layers():
        mu = layer.mean.detach().reshape(-1).double()
        w0 = P.center(path).reshape(-1).double()
        d_l = float(((mu - w0) ** 2).sum()) / (2 * lam)
        assert a["layers"][path]["distance"] == pytest.approx(d_l, rel=1e-10)
        dist += d_l
        q = torch.distributions.MultivariateNormal(mu, covariance_matrix=dense_cov(layer))

        def kl_at(log_lam, q=q, w0=w0):
            p = torch.distributions.MultivariateNormal(
                w0, covariance_matrix=math.exp(log_lam) * torch.eye(len(w0), dtype=D))
            return float(torch.distributions.kl_divergence(q, p))
        res = minimize_scalar(kl_at, bounds=(-15.0, 5.0), method="bounded",
                              options={"xatol": 1e-10})
        assert a["layers"][path]["lambda_star"] == pytest.approx(math.exp(res.x), rel=1e-4)
        best += res.fun
    assert a["distance"] == pytest.approx(dist, rel=1e-10)
    assert a["variance"] == pytest.approx(dense_kl(Q, P) - dist, rel=1e-8)
    assert a["kl_layer_lambda"] == pytest.approx(best, rel=1e-8)
    assert a["kl_layer_lambda"] <= a["kl"]
    assert kl_anatomy(dict(cert, tau=1.0)) is None and kl_anatomy({"lambda": lam}) is None


def test_recompute_checks_per_layer_kl(trained):
    X, y, init, model = trained
    cert = json.loads(json.dumps(cf.certify_checkpoint(
        model, TensorDataset(X, y), posterior="diag", iterations=5, mc_passes=1, init_model=init,
        progress=False)))
    rows = cert["kl_layers"]
    assert len(rows) >= 2 and sum(r["kl"] for r in rows) == pytest.approx(cert["kl"], rel=1e-9)
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    moved = [dict(r) for r in rows]
    moved[0]["sq_dist"] += 1.0  # one layer's share changed, the total left alone
    with pytest.raises(KfacboundError, match="sum to"):
        cf.recompute_certificate(dict(cert, kl_layers=moved))
    wrong = [dict(r) for r in rows]
    wrong[0]["kl"] += 1.0
    with pytest.raises(KfacboundError, match="layer"):
        cf.recompute_certificate(dict(cert, kl_layers=wrong))


def test_learnt_prior_of_a_batchnorm_network_trains_with_its_batchnorm(monkeypatch):
    """The prior mean of a BN network is ERM of that BN network on the prior split (train-mode
    BN), folded afterwards; folding first would train a BN-free network. Checked against the
    same SGD run here on the unfolded network and folded with an independent formula."""
    from kfacbound.models import build_model, resolve_spec

    g = torch.Generator().manual_seed(3)
    X = torch.randn(120, 6, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    spec = resolve_spec({"arch": "fc", "widths": [5], "bn": True}, input_shape=[6], num_outputs=3)
    init = build_model(spec, seed=0)
    model = build_model(spec, seed=1)
    import kfacbound.bounds.prior as prior_mod

    seen = []
    real = prior_mod.train_prior_mean

    def spy(net, *a, **k):
        seen.append(any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()))
        out = real(net, *a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(prior_mod, "train_prior_mean", spy)
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=0,
                                 mc_passes=1, init_model=init, prior_split=0.5, prior_epochs=2,
                                 loss="ce", progress=False)
    assert seen[0] is True  # the network that trained had its BatchNorm
    assert "BatchNorm" in cert["prior"]["data"]["prior_mean"]
    trained_bn = seen[1].eval()
    # it trained in train mode: batch statistics normalised it and the running statistics moved
    # away from their initial (0, 1) (a forward in eval mode would leave them there)
    assert not torch.allclose(trained_bn.bn1.running_mean, torch.zeros(()))
    assert not torch.allclose(trained_bn.bn1.running_var, torch.ones(()))
    # fold by hand: W' = diag(s) W, b' = s (b − μ) + β with s = γ/√(σ² + ε)
    lin, bn = trained_bn.fc1, trained_bn.bn1
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    W = (s[:, None] * lin.weight).detach()
    b = (s * (lin.bias - bn.running_mean) + bn.bias).detach()
    # PBB scheme, no steps: Q's mean is the folded prior mean, so ‖μ − w_p‖² = 0 and the folded
    # first layer computes the BN network's eval-mode function
    assert cert["kl_terms"]["sq_dist"] == 0.0
    with torch.no_grad():
        ref = trained_bn.bn1(trained_bn.fc1(X))
    torch.testing.assert_close(X @ W.T + b, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- audit fixes


def test_non_finite_logits_count_as_errors():
    """A NaN or infinite logit is an error, whatever argmax or the sign test would say."""
    from kfacbound.losses import zero_one_errors

    nan = float("nan")
    logits = torch.tensor([[nan, 0.0, -1.0],  # argmax picks the NaN's index 0 = the label
                           [2.0, 1.0, 0.0],  # finite and right
                           [0.0, float("inf"), 0.0],  # argmax 1 = the label, but inf
                           [0.0, 1.0, 3.0]])  # finite and wrong
    y = torch.tensor([0, 0, 1, 0])
    assert zero_one_errors(logits, y).tolist() == [True, False, True, True]
    one = torch.tensor([[nan], [-1.0], [2.0]])  # NaN > 0 is False: reads as class 0 = label
    assert zero_one_errors(one, torch.tensor([0, 0, 0])).tolist() == [True, False, True]


def test_recompute_rejects_a_shared_prior_claim_for_a_learnt_prior(trained):
    """Candidates that differ only in the posterior share nothing when the prior is learnt
    (one prior training per candidate): claiming a shared prior would halve the price."""
    X, y, init, model = trained
    cert = certify_best(model, TensorDataset(X, y), [{"posterior": "diag"},
                                                     {"posterior": "kfac"}],
                        prior_split=0.5, prior_epochs=1, iterations=5, mc_passes=1,
                        init_model=init, progress=False)
    d = json.loads(json.dumps(cert))
    assert d["selection"]["shared_prior"] is False
    assert cf.recompute_certificate(d) == pytest.approx(d["bound"], abs=1e-12)
    claimed = dict(d["selection"], shared_prior=True,
                   delta_each=d["delta"], delta_prime_each=d["delta_prime"] / 2)
    with pytest.raises(KfacboundError, match="shared prior"):
        cf.recompute_certificate(dict(d, selection=claimed))


def test_data_free_prior_refuses_w0_with_batchnorm_statistics():
    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    import copy

    fresh = copy.deepcopy(net)
    seen = copy.deepcopy(net).train()
    with torch.no_grad():
        seen(X)  # running statistics from the data
    kw = dict(posterior="diag", iterations=1, mc_passes=1, progress=False)
    with pytest.raises(KfacboundError, match="running statistics"):
        cf.certify_checkpoint(net.eval(), TensorDataset(X, y), init_model=seen, **kw)
    cert = cf.certify_checkpoint(net.eval(), TensorDataset(X, y), init_model=fresh, **kw)
    assert 0 < cert["bound"] <= 1
    # a learnt prior recomputes its statistics on the prior split: w0's do not matter there
    cert = cf.certify_checkpoint(net.eval(), TensorDataset(X, y), init_model=seen,
                                 prior_split=0.5, prior_epochs=1, **kw)
    assert 0 < cert["bound"] <= 1


def test_certificate_names_its_prior_centre_and_software(trained):
    """center_sha256 against a hash of w0's [W | b] matrices formed here; the software record
    carries the versions and the commit."""
    import hashlib

    X, y, init, model = trained
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=1,
                                 mc_passes=1, init_model=init, progress=False)
    h = hashlib.sha256()
    for name, m in init.named_modules():
        if isinstance(m, torch.nn.Linear):
            h.update(name.encode())
            h.update(torch.cat([m.weight, m.bias[:, None]], 1).detach().double().numpy().tobytes())
    assert cert["prior"]["center_sha256"] == h.hexdigest()
    other = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=1,
                                  mc_passes=1, init_model=model, progress=False)
    assert other["prior"]["center_sha256"] != h.hexdigest()
    assert {"kfacbound", "torch", "kfacbound_commit"} <= set(cert["software"])
