"""K-FAC against curvlinops (test-only reference), BackPACK vs native, BatchNorm folding, KFRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfacbound.curvature.kfac import compute_kfac
from kfacbound.models import fold_batchnorm

from .test_kfac_helpers import expand_G_reference, ggn_block

DT = torch.float64


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=DT) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=DT) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g, dtype=DT) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g, dtype=DT) * 0.2)
    return model.eval()


def bn_mlp(out: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3),
                      nn.Linear(5, 4), nn.Identity(), nn.Tanh(), nn.Linear(4, out)).to(DT)
    return _randomise_bn(m, seed)


def bn_cnn(out: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
                      nn.Conv2d(3, 4, 2), nn.BatchNorm2d(4), nn.Sigmoid(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(4, out)).to(DT)
    return _randomise_bn(m, seed)


def plain_cnn(out: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 2, stride=1, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 16, out)).to(DT)


NETS = {"mlp": (bn_mlp, (6,)), "cnn": (bn_cnn, (2, 6, 6)), "plain_cnn": (plain_cnn, (2, 6, 6))}
OUT = {"ce": 3, "bce": 1, "mse": 3}


def _data(n, shape, out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, max(out, 2), (n,),
                                                                         generator=g)


# ------------------------------------------------------------------ BackPACK backend vs native
@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
@pytest.mark.parametrize("method", ["kflr", "kfac"])
def test_backpack_backend_equals_native(net, loss, method):
    """Identical factors and BN diagonals; MC labels are identical for equal seeds."""
    build, shape = NETS[net]
    model = build(OUT[loss])
    X, y = _data(11, shape, OUT[loss])
    kw = dict(loss=loss, method=method, mc_samples=2, batch_size=4, progress=False, seed=7)
    a = compute_kfac(model, (X, y), backend="native", **kw)
    b = compute_kfac(model, (X, y), backend="backpack", **kw)
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name].G, b[name].G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a[name].A, b[name].A, rtol=1e-10, atol=1e-13)
    assert set(a.bn_diag) == set(b.bn_diag) and a.bn_diag
    for name in a.bn_diag:
        for k in ("weight", "bias"):
            torch.testing.assert_close(a.bn_diag[name][k], b.bn_diag[name][k])


# ------------------------------------------------------------------ BN parameters: exact GGN diag
@pytest.mark.parametrize("method", ["kfac", "kflr"])
def test_bn_diag_is_exact_ggn_diagonal(method):
    model = bn_cnn(3)
    X, y = _data(5, (2, 6, 6), 3)
    res = compute_kfac(model, (X, y), method=method, batch_size=2, progress=False)
    for name in ("1", "5"):
        ref = ggn_block(model, name, X, y, "ce").diagonal().reshape(-1, 2)  # [γ_c, β_c] rows
        torch.testing.assert_close(res.bn_diag[name]["weight"], ref[:, 0])
        torch.testing.assert_close(res.bn_diag[name]["bias"], ref[:, 1])


# ------------------------------------------------------------------ BatchNorm folded vs not
@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("backend", ["native", "backpack"])
def test_batchnorm_network_equals_folded_network(net, backend):
    build, shape = NETS[net]
    model = build(3)
    folded = fold_batchnorm(model)
    X, y = _data(9, shape, 3)
    kw = dict(method="kflr", batch_size=4, progress=False, backend=backend)
    a = compute_kfac(model, (X, y), **kw)
    b = compute_kfac(folded, (X, y), **kw)
    assert list(a) == list(b)
    names = list(model._modules) + [""]
    for name in a:
        torch.testing.assert_close(a[name].A, b[name].A)
        bn = model._modules.get(names[names.index(name) + 1])
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            # z_fold = s ⊙ (z − μ) + β, so ∂/∂z = s ⊙ ∂/∂z_fold and G = diag(s) G_fold diag(s)
            s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            torch.testing.assert_close(a[name].G, s[:, None] * b[name].G * s[None, :])
            # and G of the layer before BN equals the autograd reference through BN
            torch.testing.assert_close(a[name].G, expand_G_reference(model, name, X, y, "ce"))
        else:
            torch.testing.assert_close(a[name].G, b[name].G)


# ------------------------------------------------------------------ KFRA
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_kfra_one_example_equals_kflr(net):
    """With one example per dataset the batch averages of KFRA are exact: KFRA = KFLR."""
    build, shape = NETS[net]
    model = build(3)
    X, y = _data(1, shape, 3)
    a = compute_kfac(model, (X, y), method="kfra", progress=False)
    b = compute_kfac(model, (X, y), method="kflr", progress=False)
    assert a.meta["backend"] == "backpack"
    for name in a:
        torch.testing.assert_close(a[name].G, b[name].G)
        torch.testing.assert_close(a[name].A, b[name].A)


def test_kfra_last_layer_equals_kflr_many_examples():
    model = bn_mlp(3)
    X, y = _data(12, (6,), 3)
    a = compute_kfac(model, (X, y), method="kfra", batch_size=5, progress=False)
    b = compute_kfac(model, (X, y), method="kflr", batch_size=5, progress=False)
    torch.testing.assert_close(a["8"].G, b["8"].G)
    assert not torch.allclose(a["1"].G, b["1"].G)  # earlier layers are approximations


# ------------------------------------------------------------------ curvlinops 3.0.1
def _curvlinops_factors(model, loss, X, y, fisher_type, batch_size, mc_samples=1, seed=0):
    from curvlinops import KFACLinearOperator

    lossfn = {"ce": nn.CrossEntropyLoss(), "bce": nn.BCEWithLogitsLoss(),
              "mse": nn.MSELoss()}[loss]
    C = model(X[:1]).shape[1]
    if loss == "bce":
        t = y.to(DT).reshape(-1, 1)
    elif loss == "mse":
        t = nn.functional.one_hot(y, C).to(DT)
    else:
        t = y
    data = [(X[i:i + batch_size], t[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    params = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p in m.parameters()]
    op = KFACLinearOperator(model.eval(), lossfn, params, data, fisher_type=fisher_type,
                            mc_samples=mc_samples, separate_weight_and_bias=False,
                            check_deterministic=False, seed=seed)
    op.compute_kronecker_factors()
    return op._gradient_covariances, op._input_covariances


@pytest.mark.parametrize("net", ["mlp", "cnn", "plain_cnn"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_kflr_equals_curvlinops_type2(net, loss):
    build, shape = NETS[net]
    model = build(OUT[loss])
    X, y = _data(10, shape, OUT[loss])
    res = compute_kfac(model, (X, y), loss=loss, method="kflr", batch_size=4, progress=False)
    G, A = _curvlinops_factors(model, loss, X, y, "type-2", 4)
    assert set(G) == set(res)
    for name in res:
        torch.testing.assert_close(res[name].G, G[name])
        torch.testing.assert_close(res[name].A, A[name])


def test_kfac_mc_agrees_statistically_with_curvlinops_mc():
    model = bn_mlp(3)
    X, y = _data(8, (6,), 3)
    ours = compute_kfac(model, (X, y), method="kfac", mc_samples=800, batch_size=4,
                        progress=False)
    exact = compute_kfac(model, (X, y), method="kflr", batch_size=4, progress=False)
    G, A = _curvlinops_factors(model, "ce", X, y, "mc", 4, mc_samples=800)
    for name in ours:
        ref = exact[name].G
        assert (ours[name].G - ref).norm() / ref.norm() < 0.1
        assert (G[name] - ref).norm() / ref.norm() < 0.1
        torch.testing.assert_close(ours[name].A, A[name])
