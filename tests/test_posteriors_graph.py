"""Posteriors on residual graphs — a tiny zoo ResNet (identity and 1×1-projection shortcuts, with
and without BatchNorm) — and on every shared reference case of tests/conftest.py, against
independent computations.

References: the BatchNorm-folded model itself (mean network, vanishing stds); explicit networks
sampled weight by weight — full W̃ = M + noise written into a plain copy of the folded model with
``set_layer_matrix`` — for the output law; dense ``torch.distributions`` Gaussians for the KL;
the module's own forward for per-example conv kernels; the certificate recomputed from its JSON
with the formulas of tests/test_certify.py.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kfacbound.bounds import certify as cf
from kfacbound.bounds.families import build_posterior
from kfacbound.bounds.posteriors import LayerSlot
from kfacbound.bounds.prior import build_prior
from kfacbound.curvature.layout import curvature_layers, layer_matrix, set_layer_matrix
from kfacbound.errors import UnsupportedModuleError
from kfacbound.models import build_model, fold_batchnorm, resolve_spec

from .conftest import over_cases, randomise_bn
from .test_certify import independent_recompute
from .test_kfac_helpers import layer_io
from .test_posteriors import dense_cov, random_eigenbases, random_factors

D = torch.float64
# 1×8×8 inputs: layer1 two blocks with identity shortcuts, layer2 one block with stride 2 and a
# 1×1-projection shortcut (layer2.0.downsample.0); 3 classes.
SPEC = {"arch": "resnet", "blocks": [2, 1], "channels": [2, 3]}
PATHS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
         "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "fc"]


def tiny_resnet(bn: bool, seed: int = 0, dtype: torch.dtype = D) -> nn.Module:
    model = build_model(resolve_spec(dict(SPEC, bn=bn), [1, 8, 8], 3), seed=seed).to(dtype)
    return randomise_bn(model, seed + 100)  # non-trivial eval statistics, ReLUs alive


def folded(model: nn.Module) -> nn.Module:
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return fold_batchnorm(model) if bn else model


def build(kind: str, model: nn.Module, seed: int, **kw):
    gen = torch.Generator().manual_seed(seed)
    f = folded(model)
    return build_posterior(model, kind, factors=random_factors(f, gen),
                           eigenbases=random_eigenbases(f, gen), dtype=D, **kw)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=D)


def explicit_outputs(Q, model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """Outputs on ``x`` (one example) of ``draws`` networks, each with full weights
    W̃ = M + noise drawn per layer and written into a plain copy of the folded model."""
    net = copy.deepcopy(folded(model))
    mods = dict(curvature_layers(net))
    out = []
    with torch.no_grad():
        for _ in range(draws):
            for path, layer in Q.layers():
                set_layer_matrix(mods[path], layer.mean + layer.sample_noise(1)[0])
            out.append(net(x))
    return torch.cat(out)


@pytest.mark.parametrize("bn", [True, False])
def test_layers_paths_and_parameters(bn):
    model = tiny_resnet(bn)
    Q = build("kfac", model, 0, std_init=0.1)
    assert [p for p, _ in Q.layers()] == PATHS == [p for p, _ in curvature_layers(folded(model))]
    means = [n for n, _ in Q.named_parameters() if n.endswith(".mean")]
    assert len(means) == len(PATHS)
    assert all(isinstance(Q.net.get_submodule(p), LayerSlot) for p in PATHS)
    assert Q.numel() == sum(layer_matrix(m).numel() for _, m in curvature_layers(folded(model)))


# ------------------------------------------------------------------ over the reference cases
@over_cases()
@pytest.mark.parametrize("kind", ["diag", "kfac", "exact"])
def test_mean_and_vanishing_stds_give_the_model(case, kind):
    """The mean network is the (unfolded, eval-mode) model; with vanishing stds every sampler
    (per example, per batch, repeated passes) gives it too, and still samples."""
    model = case.model()
    Q = build(kind, model, 1, std_init=1e-9)
    X, _ = case.data(5)
    with torch.no_grad():
        ref = model(X)
        assert torch.allclose(folded(model)(X), ref, atol=1e-10, rtol=0)
        assert torch.allclose(Q(X, sample=False), ref, atol=1e-10, rtol=0)
        for per_example in (True, False):
            assert torch.allclose(Q(X, per_example=per_example), ref, atol=1e-6, rtol=0)
        rep = Q.forward_repeated(X, 3)
    assert rep.shape == (3, *ref.shape)
    assert torch.allclose(rep, ref.expand(3, *ref.shape), atol=1e-6, rtol=0)
    assert not torch.equal(rep[0], rep[1])  # still sampled


@over_cases(where=lambda c: c.conv)
def test_per_example_kernels_match_the_layer_module(case):
    """A conv layer sampled per example (one grouped convolution) equals the module's own
    forward with that example's kernel W̃ = M + noise written into a copy of it."""
    model = folded(case.model())
    Q = build("kfac", model, 6, std_init=0.2)
    X, _ = case.data(4)
    convs = [(p, layer) for p, layer in Q.layers() if layer.kind == "conv"]
    assert convs
    for path, layer in convs:
        a = torch.cat([layer_io(model, path, x)[0] for x in X])  # the layer's inputs
        module = copy.deepcopy(model.get_submodule(path))
        fixed = layer.sample_noise(len(a))
        layer.sample_noise = lambda num, fixed=fixed: fixed[:num]
        with torch.no_grad():
            out = layer(a, sample=True, per_example=True)
            for i in range(len(a)):
                set_layer_matrix(module, layer.mean + fixed[i])
                assert torch.allclose(out[i:i + 1], module(a[i:i + 1]), atol=1e-12, rtol=0)


@over_cases()
@pytest.mark.parametrize("kind", ["diag", "kfac", "exact"])
def test_kl_matches_dense_torch_distributions(case, kind):
    model, init = case.model(0), case.model(1)
    Q = build(kind, model, 11, std_init=0.05)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():  # non-uniform variances and means away from the trained weights
        for _, layer in Q.layers():
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen, dtype=D))
            layer.mean.add_(0.01 * torch.randn(layer.mean.shape, generator=gen, dtype=D))
    P = build_prior(Q, init, lam=0.02)
    ref = 0.0
    init_layers = dict(curvature_layers(folded(init)))
    for path, layer in Q.layers():
        mu = layer.mean.detach().reshape(-1)
        w0 = layer_matrix(init_layers[path]).detach().reshape(-1).double()
        q = torch.distributions.MultivariateNormal(mu, covariance_matrix=dense_cov(layer))
        p = torch.distributions.MultivariateNormal(
            w0, covariance_matrix=0.02 * torch.eye(len(mu), dtype=D))
        ref += float(torch.distributions.kl_divergence(q, p))
    assert float(Q.kl(P, dtype=D).detach()) == pytest.approx(ref, rel=1e-9)


@over_cases()
def test_mean_model_round_trips(case):
    model = case.model()
    Q = build("diag", model, 13, std_init=0.1)
    f = folded(model)
    mm = Q.mean_model()
    assert type(mm) is type(model) and not any(isinstance(m, LayerSlot) for m in mm.modules())
    for (pa, a), (pb, b) in zip(curvature_layers(mm), curvature_layers(f), strict=True):
        assert pa == pb and torch.equal(layer_matrix(a), layer_matrix(b))
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for _, layer in Q.layers():
            layer.mean.add_(0.1 * torch.randn(layer.mean.shape, generator=gen, dtype=D))
    mm = Q.mean_model()
    mods = dict(curvature_layers(mm))
    for path, layer in Q.layers():
        assert torch.equal(layer_matrix(mods[path]), layer.mean.detach())
    X, _ = case.data(4)
    with torch.no_grad():
        assert torch.allclose(mm(X), Q(X, sample=False), atol=1e-12, rtol=0)
    Q2 = build_posterior(mm, "diag", std_init=0.1, dtype=D)
    for (_, a), (_, b) in zip(Q.layers(), Q2.layers(), strict=True):
        assert torch.equal(a.mean, b.mean)


# ------------------------------------------------------------------ output laws on the ResNet
def _close_in_law(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Per logit: means and variances within 5 standard errors (the variance's from the
    sample kurtosis κ: Var(s²) ≈ σ⁴ (κ − 1)/n)."""
    for c in range(out.shape[1]):
        o, r = out[:, c], ref[:, c]
        se = float(r.std()) * math.sqrt(1 / len(r) + 1 / len(o))
        assert abs(float(o.mean() - r.mean())) < 5 * se, c
        v_se2 = 0.0
        for t in (o, r):
            v = float(t.var())
            kurt = float(((t - t.mean()) ** 4).mean()) / v**2
            v_se2 += v**2 * (kurt - 1) / len(t)
        assert abs(float(o.var() - r.var())) < 5 * math.sqrt(v_se2), c


@pytest.mark.parametrize("bn,kind", [(True, "diag"), (False, "diag"), (True, "kfac"),
                                     (False, "exact")])
def test_output_law_matches_explicit_networks(bn, kind):
    """Rows of one batch get independent networks from Q through the whole residual graph
    (per-example kernels in every conv, shortcuts included): outputs for copies of one input
    have the law of explicitly sampled networks, and consecutive rows are uncorrelated."""
    model = tiny_resnet(bn)
    Q = build(kind, model, 3, std_init=0.12)
    x = images(1, seed=4)
    torch.manual_seed(5)
    with torch.no_grad():
        out = Q(x.expand(20000, 1, 8, 8), per_example=True)
    torch.manual_seed(6)
    ref = explicit_outputs(Q, model, x, 3000)
    assert float(ref.std(0).min()) > 0.05  # the noise matters
    _close_in_law(out, ref)
    for c in range(3):
        r = torch.corrcoef(torch.stack([out[:-1:2, c], out[1::2, c]]))[0, 1]
        assert abs(float(r)) < 0.04


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_repeated_passes_match_explicit_networks(kind):
    """forward_repeated on a residual graph (input repeated, one sampled run): the law of
    independent networks, passes and examples uncorrelated."""
    model = tiny_resnet(True)
    Q = build(kind, model, 7, std_init=0.12)
    x = images(1, seed=8)
    torch.manual_seed(9)
    out = Q.forward_repeated(x.expand(100, 1, 8, 8), 150)
    assert out.shape == (150, 100, 3)
    torch.manual_seed(10)
    ref = explicit_outputs(Q, model, x, 3000)
    _close_in_law(out.reshape(-1, 3), ref)
    o = out[..., 0]
    r_pass = torch.corrcoef(torch.stack([o[0::2].reshape(-1), o[1::2].reshape(-1)]))[0, 1]
    r_ex = torch.corrcoef(torch.stack([o[:, 0::2].reshape(-1), o[:, 1::2].reshape(-1)]))[0, 1]
    assert abs(float(r_pass)) < 0.04 and abs(float(r_ex)) < 0.04


@pytest.mark.parametrize("bn,posterior", [(True, "diag"), (True, "kfac"), (False, "kfac"),
                                          (True, "exact")])
def test_certificate_on_a_resnet_recomputes(bn, posterior):
    """End to end: certify_checkpoint on a tiny ResNet (BN folded, or no BN), K-FAC factors from
    the curvature engine on the nested paths (exact: dense layer Hessians at the nested paths);
    the JSON certificate recomputes."""
    torch.manual_seed(0)
    model = tiny_resnet(bn, 0, torch.float32)
    init = tiny_resnet(bn, 1, torch.float32)
    for m in init.modules():  # w0 of a data-free prior: BN statistics as initialised
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(60, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior=posterior,
                                 iterations=3, mc_passes=1, init_model=init, batch_size=20,
                                 progress=False)
    cert = json.loads(json.dumps(cert))
    assert cert["n"] == 60 and cert["mc_samples"] == 60
    assert cert["num_params"] == sum(layer_matrix(m).numel()
                                     for _, m in curvature_layers(folded(model)))
    assert cert["bound"] == pytest.approx(independent_recompute(cert), abs=1e-9)
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    assert cert["mc_error"] <= cert["mc_error_bound"] <= cert["bound"] <= 1


def test_unsupported_modules_name_their_path():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(UnsupportedModuleError, match=r"'1\.1' \(LayerNorm\)"):
        build_posterior(model, "diag", std_init=0.1)
    Q = build_posterior(Twice(), "diag", std_init=0.1)
    with torch.no_grad():
        Q(torch.randn(2, 3), sample=False)  # the mean network is fine
        with pytest.raises(UnsupportedModuleError, match="'fc' was applied 2 times"):
            Q(torch.randn(2, 3))
    shared = nn.Linear(3, 3)
    with pytest.raises(UnsupportedModuleError, match="shares its module"):
        build_posterior(nn.Sequential(shared, nn.ReLU(), shared), "diag", std_init=0.1)
