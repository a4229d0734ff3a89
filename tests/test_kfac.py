"""K-FAC factors against independent autograd references (float64, tiny networks).

The reference checks run over the shared cases of tests/conftest.py (MLPs with and without
bias, BatchNorm, CNNs, a ResNet, bce and MSE, a registered Conv1d); the rest use local nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfacbound.curvature.kfac import compute_kfac
from kfacbound.errors import KfacboundError, UnsupportedModuleError

from .conftest import over_cases
from .test_kfac_helpers import close, ggn_block, kfc_reference, layer_io

DT = torch.float64


def _mlp(out: int, act=nn.Tanh, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=bias), act(), nn.Linear(5, 4),
                         nn.ReLU(), nn.Linear(4, out, bias=bias)).to(DT)


def _cnn(out: int, seed=0, pool=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid()]
    layers += [nn.MaxPool2d(2)] if pool else []
    side = 2 if pool else 4
    layers += [nn.Conv2d(3, 2, 2, stride=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(2 * (side - 1) ** 2, out)]
    return nn.Sequential(*layers).to(DT)


def _data(n, shape, out, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    y = torch.randint(0, max(out, 2), (n,), generator=g)
    return X, y


def _outputs(loss):
    return {"ce": 3, "bce": 1, "mse": 3}[loss]


def _backends(case) -> tuple[str, ...]:
    """The BackPACK backend needs an nn.Sequential of modules with BackPACK rules."""
    return ("native", "backpack") if case.sequential else ("native",)


@over_cases()
def test_kflr_factors_equal_the_kfc_references(case):
    """n examples in several batches (uneven last one): G and Ã of every layer equal the output
    Jacobian / hand-cut patch references of the KFC convention (G = mean Σ_t J_tᵀΛJ_t,
    Ã = mean of ũ ũᵀ over examples and positions), in both backends."""
    model = case.model()
    X, y = case.data(7)
    refs = {name: kfc_reference(model, name, X, y, case.loss) for name in case.layers(model)}
    for backend in _backends(case):
        res = compute_kfac(model, TensorDataset(X, y), loss=case.loss, method="kflr",
                           batch_size=3, backend=backend, progress=False)
        assert list(res) == list(refs)
        assert res.meta["n"] == 7 and res.meta["conv_convention"] == "kfc-expand"
        for name, (G, A) in refs.items():
            close(res[name].G, G)
            close(res[name].A, A)


@over_cases()
def test_kflr_one_example_is_the_exact_ggn_block(case):
    """n = 1: G ⊗ Ã is the dense GGN block (autograd J_θᵀ Λ J_θ) of every layer with a single
    output position (T = 1), in both backends."""
    model = case.model()
    X, y = case.data(1)
    single = [name for name in case.layers(model) if layer_io(model, name, X[0])[1][0, 0].numel()
              == 1]
    assert single
    refs = {name: ggn_block(model, name, X, y, case.loss) for name in single}
    for backend in _backends(case):
        res = compute_kfac(model, (X, y), loss=case.loss, method="kflr", backend=backend,
                           progress=False)
        for name, ref in refs.items():
            close(res[name].to_dense(), ref)


@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
def test_kflr_one_example_is_exact_ggn_conv(loss):
    """A conv whose output is 1×1 (T = 1) has an exact KFLR block for one example."""
    C = _outputs(loss)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 4),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4, C)).to(DT)
    X, y = _data(1, (2, 4, 4), C)
    res = compute_kfac(model, TensorDataset(X, y), loss=loss, method="kflr", progress=False)
    ref = ggn_block(model, "2", X, y, loss)
    torch.testing.assert_close(res["2"].to_dense(), ref, rtol=1e-9, atol=1e-12)
    # and the bias block of the first conv (T = 16) is Σ_t of its expand G: check against autograd
    torch.testing.assert_close(res["0"].G, kfc_reference(model, "0", X, y, loss)[0])


def test_kfac_mc_is_unbiased_for_kflr():
    """E[G_MC] = G_KFLR: many MC samples converge to the exact factor (CLT tolerance)."""
    model = _mlp(3)
    X, y = _data(10, (6,), 3)
    exact = compute_kfac(model, (X, y), loss="ce", method="kflr", progress=False)
    mc = compute_kfac(model, (X, y), loss="ce", method="kfac", mc_samples=4000, progress=False,
                      seed=3)
    for name in exact:
        G, Gm = exact[name].G, mc[name].G
        assert (Gm - G).norm() / G.norm() < 0.05
        torch.testing.assert_close(mc[name].A, exact[name].A)


def test_kfac_seed_reproducible_and_rng_restored():
    model = _mlp(3)
    X, y = _data(10, (6,), 3)
    state = torch.random.get_rng_state()
    a = compute_kfac(model, (X, y), method="kfac", seed=5, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = compute_kfac(model, (X, y), method="kfac", seed=5, progress=False)
    c = compute_kfac(model, (X, y), method="kfac", seed=6, progress=False)
    assert torch.equal(a["1"].G, b["1"].G) and not torch.equal(a["1"].G, c["1"].G)


def test_dataloader_and_separate_bias():
    model = _mlp(3)
    X, y = _data(9, (6,), 3)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    hom = compute_kfac(model, TensorDataset(X, y), method="kflr", batch_size=4, progress=False)
    sep = compute_kfac(model, loader, method="kflr", bias="separate", progress=False)
    for name in hom:
        torch.testing.assert_close(sep[name].A, hom[name].A[:-1, :-1])
        torch.testing.assert_close(sep[name].G_bias, hom[name].G)
        assert sep[name].G_bias is not None and not sep[name].homogeneous
    # separate = homogeneous block without the weight–bias cross terms
    d_hom, d_sep = hom["3"].to_dense(), sep["3"].to_dense()
    out, cols = 4, 6
    mask = torch.zeros(out, cols, out, cols, dtype=torch.bool)
    mask[:, :-1, :, :-1] = True
    mask[:, -1, :, -1] = True
    mask = mask.reshape(out * cols, out * cols)
    torch.testing.assert_close(d_sep[mask], d_hom[mask])
    assert d_sep[~mask].abs().max() == 0


def test_layers_without_bias():
    model = _mlp(3, bias=False)
    X, y = _data(5, (6,), 3)
    res = compute_kfac(model, (X, y), method="kflr", progress=False)
    assert res["1"].A.shape == (6, 6) and not res["1"].bias and res["1"].dim == 30
    assert res["3"].A.shape == (6, 6) and res["3"].bias and res["3"].dim == 24
    torch.testing.assert_close(res["1"].A, kfc_reference(model, "1", X, y, "ce")[1])


def test_caller_model_untouched_and_modes():
    model = _mlp(3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = _data(5, (6,), 3)
    compute_kfac(model, (X, y), method="kflr", progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_module_error_names_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 4), nn.GELU()),
                          nn.Linear(4, 3)).to(DT)
    X, y = _data(4, (6,), 3)
    with pytest.raises(UnsupportedModuleError, match=r"'1\.1'.*GELU.*supported: Linear"):
        compute_kfac(model, (X, y), progress=False)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    with pytest.raises(UnsupportedModuleError, match="'0'.*groups"):
        compute_kfac(grouped, _data(2, (2, 4, 4), 3), progress=False)


def test_bad_arguments():
    model = _mlp(3)
    X, y = _data(4, (6,), 3)
    with pytest.raises(KfacboundError, match="method"):
        compute_kfac(model, (X, y), method="ekfac", progress=False)
    with pytest.raises(KfacboundError, match="KFRA"):
        compute_kfac(model, (X, y), method="kfra", backend="native", progress=False)
    with pytest.raises(KfacboundError, match="one output logit"):
        compute_kfac(model, (X, y), loss="bce", progress=False)
    with pytest.raises(KfacboundError, match="TensorDataset"):
        compute_kfac(model, X, progress=False)
    one_logit = _mlp(1)
    Xb, yb = _data(4, (6,), 2)
    with pytest.raises(KfacboundError, match="KFRA.*bce"):
        compute_kfac(one_logit, (Xb, yb), method="kfra", loss="bce", progress=False)


@pytest.mark.parametrize("loss,C", [("ce", 2), ("ce", 5), ("bce", 1), ("mse", 4)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sqrt_columns_square_to_loss_hessian(loss, C, scale):
    """Σ_v s_v s_vᵀ = Λ_n (autograd Hessian of ℓ_n); scale 30 gives near one-hot softmax."""
    from kfacbound.curvature.kfac import sqrt_columns

    from .test_kfac_helpers import loss_hessian

    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, C, generator=g, dtype=DT) * scale
    y = torch.randint(0, max(C, 2), (6,), generator=g)
    cols = sqrt_columns(loss, f, exact=True)
    assert cols.shape[0] == (C - 1 if loss == "ce" else C)
    for n in range(6):
        ref = loss_hessian(loss, f[n], y[n])
        torch.testing.assert_close(cols[:, n, :].T @ cols[:, n, :], ref, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", ["native", "backpack"])
def test_inplace_activations_are_handled(backend):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Dropout(0.5, inplace=True),
              nn.Linear(5, 3)]
    model = nn.Sequential(*layers).to(DT)
    X, y = _data(7, (6,), 3)
    res = compute_kfac(model, (X, y), method="kflr", backend=backend, progress=False)
    model[1].inplace = model[2].inplace = False
    for name in ("0", "3"):
        torch.testing.assert_close(res[name].G, kfc_reference(model, name, X, y, "ce")[0])


@pytest.mark.parametrize("backend", ["native", "backpack"])
def test_float32_conv_factors_are_accurate(backend):
    """Long conv reductions (columns × examples × positions rows) stay float64-accurate.

    One float32 GEMM over the 4.6M rows of this conv's G gave 7e-5 relative error.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                          nn.Flatten(), nn.Linear(4 * 64, 10))
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(500, 1, 32, 32, generator=g), torch.randint(0, 10, (500,), generator=g)
    ref = compute_kfac(model.double(), (X.double(), y), batch_size=500, progress=False)
    res = compute_kfac(model.float(), (X, y), batch_size=500, progress=False, backend=backend)
    for name, tol in (("0", 2e-6), ("4", 2e-5)):  # "4": one float32 GEMM of 4.5k rows
        for attr in ("G", "A"):
            a, b = getattr(res[name], attr), getattr(ref[name], attr)
            assert (a - b).abs().max() / b.abs().max() < tol, (name, attr)
