"""K-FAC against curvlinops (test-only reference), BackPACK vs native, BatchNorm folding, KFRA,
over the shared reference cases of tests/conftest.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfacbound.curvature.kfac import compute_kfac
from kfacbound.models import fold_batchnorm

from .conftest import CASES, DT, over_cases
from .test_kfac_helpers import close, ggn_block, kfc_reference

MLP_BN = next(c for c in CASES if c.name == "mlp_bn")


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------ BackPACK backend vs native
@over_cases(where=lambda c: c.sequential)
@pytest.mark.parametrize("method", ["kflr", "kfac"])
def test_backpack_backend_equals_native(case, method):
    """Identical factors and BN diagonals; MC labels are identical for equal seeds."""
    model = case.model()
    X, y = case.data(11)
    kw = dict(loss=case.loss, method=method, mc_samples=2, batch_size=4, progress=False, seed=7)
    a = compute_kfac(model, (X, y), backend="native", **kw)
    b = compute_kfac(model, (X, y), backend="backpack", **kw)
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name].G, b[name].G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a[name].A, b[name].A, rtol=1e-10, atol=1e-13)
    assert set(a.bn_diag) == set(b.bn_diag) == set(_bns(model))
    for name in a.bn_diag:
        for k in ("weight", "bias"):
            torch.testing.assert_close(a.bn_diag[name][k], b.bn_diag[name][k])


# ------------------------------------------------------------------ BN parameters: exact GGN diag
@over_cases(where=lambda c: c.bn)
@pytest.mark.parametrize("method", ["kfac", "kflr"])
def test_bn_diag_is_exact_ggn_diagonal(case, method):
    """Every BatchNorm (nested paths included) gets the exact GGN diagonal of γ and β."""
    model = case.model()
    X, y = case.data(5)
    res = compute_kfac(model, (X, y), loss=case.loss, method=method, batch_size=2,
                       progress=False)
    assert sorted(res.bn_diag) == sorted(_bns(model))
    for name in res.bn_diag:
        ref = ggn_block(model, name, X, y, case.loss).diagonal().reshape(-1, 2)  # [γ_c, β_c]
        close(res.bn_diag[name]["weight"], ref[:, 0])
        close(res.bn_diag[name]["bias"], ref[:, 1])


# ------------------------------------------------------------------ BatchNorm folded vs not
@over_cases(where=lambda c: c.bn and c.sequential)
@pytest.mark.parametrize("backend", ["native", "backpack"])
def test_batchnorm_network_equals_folded_network(case, backend):
    model = case.model()
    folded = fold_batchnorm(model)
    X, y = case.data(9)
    kw = dict(loss=case.loss, method="kflr", batch_size=4, progress=False, backend=backend)
    a = compute_kfac(model, (X, y), **kw)
    b = compute_kfac(folded, (X, y), **kw)
    assert list(a) == list(b)
    names = list(model._modules) + [""]
    for name in a:
        # a layer without a bias gets one when BN is folded into it: Ã gains the row/column 1
        A_fold = b[name].A if a[name].bias == b[name].bias else b[name].A[:-1, :-1]
        torch.testing.assert_close(a[name].A, A_fold)
        bn = model._modules.get(names[names.index(name) + 1])
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            # z_fold = s ⊙ (z − μ) + β, so ∂/∂z = s ⊙ ∂/∂z_fold and G = diag(s) G_fold diag(s)
            s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            torch.testing.assert_close(a[name].G, s[:, None] * b[name].G * s[None, :])
            # and G of the layer before BN equals the autograd reference through BN
            close(a[name].G, kfc_reference(model, name, X, y, case.loss)[0])
        else:
            torch.testing.assert_close(a[name].G, b[name].G)


# ------------------------------------------------------------------ KFRA
@over_cases(where=lambda c: c.sequential and c.loss != "bce")
def test_kfra_one_example_equals_kflr(case):
    """With one example per dataset the batch averages of KFRA are exact: KFRA = KFLR."""
    model = case.model()
    X, y = case.data(1)
    a = compute_kfac(model, (X, y), loss=case.loss, method="kfra", progress=False)
    b = compute_kfac(model, (X, y), loss=case.loss, method="kflr", progress=False)
    assert a.meta["backend"] == "backpack"
    for name in a:
        torch.testing.assert_close(a[name].G, b[name].G)
        torch.testing.assert_close(a[name].A, b[name].A)


def test_kfra_last_layer_equals_kflr_many_examples():
    model = MLP_BN.model()
    X, y = MLP_BN.data(12)
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


@over_cases(where=lambda c: not c.rules)  # curvlinops knows Linear and Conv2d layers
def test_kflr_equals_curvlinops_type2(case):
    model = case.model()
    X, y = case.data(10)
    res = compute_kfac(model, (X, y), loss=case.loss, method="kflr", batch_size=4,
                       progress=False)
    G, A = _curvlinops_factors(model, case.loss, X, y, "type-2", 4)
    assert set(G) == set(res)
    for name in res:
        close(res[name].G, G[name])
        close(res[name].A, A[name])


def test_kfac_mc_agrees_statistically_with_curvlinops_mc():
    model = MLP_BN.model()
    X, y = MLP_BN.data(8)
    ours = compute_kfac(model, (X, y), method="kfac", mc_samples=800, batch_size=4,
                        progress=False)
    exact = compute_kfac(model, (X, y), method="kflr", batch_size=4, progress=False)
    G, A = _curvlinops_factors(model, "ce", X, y, "mc", 4, mc_samples=800)
    for name in ours:
        ref = exact[name].G
        assert (ours[name].G - ref).norm() / ref.norm() < 0.1
        assert (G[name] - ref).norm() / ref.norm() < 0.1
        torch.testing.assert_close(ours[name].A, A[name])
