"""Exact dense curvature and operators against independent float64 references.

References: ``torch.autograd.functional.hessian`` / ``jacobian`` on the parameters in torch's own
order (permuted to the [W | b] layout by an index built here), and loss Hessians Λ written out
analytically (softmax, logistic, MSE). The reference checks run over the shared cases of
tests/conftest.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfacbound.curvature.exact import (
    _dense_ggn,
    _dense_hessian,
    _problem,
    exact_hessian,
    functional_part_vanishes,
    hessian_parts,
    layer_hessian,
)
from kfacbound.curvature.operators import ggn_operator, hessian_operator
from kfacbound.errors import KfacboundError
from kfacbound.losses import make_loss, prepare_targets

from .conftest import over_cases

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a loaded machine (10-20x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(C: int, act=nn.Tanh, bn=True, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(5, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [act(), nn.Linear(6, 4, bias=False), act(), nn.Linear(4, C)]
    model = nn.Sequential(*layers).to(DT)
    if bn:
        model[2].running_mean.normal_()
        model[2].running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            model[2].weight.uniform_(0.5, 1.5)
            model[2].bias.normal_()
    return model.eval()


def _data(shape, C, n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    y = torch.randint(0, max(C, 2), (n,), generator=g)
    return X, y


def _targets(loss, y, C):
    T = prepare_targets(loss, y, C)
    return T.to(DT) if T.is_floating_point() else T


LAYERS = (nn.Linear, nn.modules.conv._ConvNd)  # blocks in the [W | b] layout


def _layout_index(m: nn.Module) -> torch.Tensor:
    """vec([W | b]) row-major, as positions in torch's order (W flattened, then b)."""
    w = torch.arange(m.weight.numel()).reshape(m.weight.shape[0], -1)
    cols = [w] if m.bias is None else [w, m.weight.numel() + torch.arange(len(m.bias))[:, None]]
    return torch.cat(cols, 1).reshape(-1)


def _reference(model, X, y, loss, labels=None):
    """(H, J, p) by torch.autograd.functional in torch order, permuted into our layout."""
    C = model(X[:1]).shape[-1]
    T = _targets(loss, y, C)
    modules = dict(model.named_modules())
    if labels is None:
        labels = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    names, index, offset = [], [], 0
    for label in labels:
        m = modules.get(label)
        if m is not None and not isinstance(m, nn.Parameter) and label in modules:
            own = [f"{label}.{k}" for k, _ in m.named_parameters(recurse=False)]
            size = sum(p.numel() for p in m.parameters(recurse=False))
            idx = _layout_index(m) if isinstance(m, LAYERS) else torch.arange(size)
        else:
            own = [label]
            size = dict(model.named_parameters())[label].numel()
            idx = torch.arange(size)
        names += own
        index.append(idx + offset)
        offset += size
    index = torch.cat(index)
    params = dict(model.named_parameters())
    base = {**{k: v.detach() for k, v in params.items()}, **dict(model.named_buffers())}
    shapes = [params[n].shape for n in names]

    def unflat(vec):
        out, s = {}, 0
        for n, sh in zip(names, shapes, strict=True):
            k = int(np.prod(sh))
            out[n] = vec[s:s + k].reshape(sh)
            s += k
        return out
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def outputs(vec):
        return functional_call(model, {**base, **unflat(vec)}, (X,))

    def objective(vec):
        return make_loss(loss)(outputs(vec), T)
    H = torch.autograd.functional.hessian(objective, theta, vectorize=True)
    J = torch.autograd.functional.jacobian(outputs, theta, vectorize=True)  # (n, C, p)
    return H[index][:, index], J[:, :, index], T


def _lambda(loss, F, T):
    """Per-example loss Hessians written out by hand."""
    n, C = F.shape
    if loss == "ce":
        p = torch.softmax(F, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if loss == "bce":
        s = torch.sigmoid(F)
        return (s * (1 - s)).reshape(n, 1, 1)
    return (2.0 / C) * torch.eye(C, dtype=DT).expand(n, C, C)


@over_cases()
def test_full_hessian_and_ggn_match_autograd(case):
    model = case.model()
    X, y = case.data(11)
    H_ref, J, T = _reference(model, X, y, case.loss)
    parts = hessian_parts(model, X, y, case.loss, batch_size=4)  # 3 batches: 4, 4, 3
    assert torch.allclose(parts.H, H_ref, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        F = model(X)
    Lam = _lambda(case.loss, F, T)
    G_ref = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) / len(X)
    assert torch.allclose(parts.H_O, G_ref, atol=1e-12, rtol=1e-10)
    assert torch.allclose(parts.H_F, H_ref - G_ref, atol=1e-12, rtol=1e-10)
    assert parts.H_F.abs().max() > 1e-6  # a genuine functional part (cross-layer terms)


@over_cases()
def test_layer_blocks_and_subsets_are_sub_blocks(case):
    model = case.model()
    X, y = case.data(7)
    labels = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    for label in labels:
        H_ref, _, _ = _reference(model, X, y, case.loss, [label])
        H = layer_hessian(model, X, y, case.loss, label, batch_size=5)
        assert torch.allclose(H, H_ref, atol=1e-12, rtol=1e-10), label
    subset = [labels[-1], f"{labels[0]}.weight"]
    H_ref, _, _ = _reference(model, X, y, case.loss, subset)
    assert torch.allclose(exact_hessian(model, X, y, case.loss, subset), H_ref, atol=1e-12)


def test_relu_layer_block_equals_its_ggn_block_but_tanh_does_not():
    X, y = _data((5,), 3, n=13)
    relu = _mlp(3, act=nn.ReLU, bn=False, seed=3)
    for layer in ("1", "3", "5"):
        H = layer_hessian(relu, X, y, "ce", layer)
        G = layer_hessian(relu, X, y, "ce", layer, part="H_O")
        assert torch.allclose(H, G, atol=1e-13), layer
    # the cross-layer blocks of the full ReLU Hessian still carry functional terms
    full = hessian_parts(relu, X, y, "ce")
    assert full.H_F.abs().max() > 1e-6
    tanh = _mlp(3, act=nn.Tanh, bn=False, seed=3)
    H = layer_hessian(tanh, X, y, "ce", "1")
    G = layer_hessian(tanh, X, y, "ce", "1", part="H_O")
    assert (H - G).abs().max() > 1e-6


@over_cases()
def test_ggn_shortcut_is_taken_exactly_where_the_functional_block_vanishes(case):
    """functional_part_vanishes decides per block; the dense block it leads to (H_O from
    per-example Jacobians, or Hessian-vector products) matches autograd's float64 Hessian, and
    the batch-function Jacobian agrees with the per-example one."""
    model = case.model()
    X, y = case.data(9)
    labels = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    smooth = any(isinstance(m, (nn.Tanh, nn.Sigmoid, nn.GELU)) for m in model.modules())
    for label in labels:
        problem = _problem(model, X, y, case.loss, [label], None, None, DT, None, None)
        H_ref, J_ref, _ = _reference(model, X, y, case.loss, [label])
        G_ref = _dense_ggn(problem, False)
        truth = bool((H_ref - G_ref).abs().max() <= 1e-12 * H_ref.abs().max())
        assert functional_part_vanishes(problem) == truth, label
        # on a random 4 of the 9 examples the test decides as the full data does
        assert functional_part_vanishes(problem, max_examples=4, seed=1) == truth, label
        if not smooth and case.loss == "ce":
            assert truth, label  # one layer of a ReLU / eval-BN / residual network
        H = _dense_hessian(problem, False, structured=False)
        assert torch.allclose(H, H_ref, atol=1e-12, rtol=1e-10), label
        assert torch.allclose(problem.jacobian(X), J_ref, atol=1e-12), label
        assert torch.allclose(problem.batch_jacobian(X), J_ref, atol=1e-12), label
    both = _problem(model, X, y, case.loss, labels[:2], None, None, DT, None, None)
    assert not functional_part_vanishes(both)  # cross-layer terms


def test_problem_subset_is_the_problem_on_those_examples():
    X, y = _data((5,), 3, n=13)
    model = _mlp(3, act=nn.Tanh, bn=False, seed=4)
    idx = torch.tensor([0, 3, 4, 9, 12])
    full = _problem(model, X, y, "ce", ["3"], 4, None, DT, None, None)  # batches of 4
    fresh = _problem(model, X, y, "ce", ["3"], 4, None, DT, None, None)
    direct = _problem(model, X[idx], y[idx], "ce", ["3"], 4, None, DT, None, None)
    v = torch.randn(full.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    full.hvp(v), full.ggnvp(v)  # fill the parent's caches first
    sub = full.subset(idx)
    assert sub.n == 5 and full.n == 13
    assert torch.allclose(sub.hvp(v), direct.hvp(v), atol=1e-14)
    assert torch.allclose(sub.ggnvp(v), direct.ggnvp(v), atol=1e-14)
    # the full problem is intact: its own products, caches included
    assert torch.allclose(full.hvp(v), fresh.hvp(v), atol=1e-14)
    assert torch.allclose(full.ggnvp(v), fresh.ggnvp(v), atol=1e-14)
    assert not torch.allclose(full.hvp(v), direct.hvp(v), atol=1e-6)


@over_cases()
def test_operators_match_dense(case):
    """Hessian and GGN operators (batched, chunked) against the autograd references."""
    model = case.model()
    X, y = case.data(9)
    labels = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    rng = np.random.default_rng(0)
    with torch.no_grad():
        F = model(X)
    for params in (None, labels[-1], [labels[0], f"{labels[1]}.weight"]):
        H_ref, J, T = _reference(model, X, y, case.loss, None if params is None else
                                 [params] if isinstance(params, str) else params)
        H = H_ref.numpy()
        if params is None:
            H_full = H
        G = (torch.einsum("ncp,ncd,ndq->pq", J, _lambda(case.loss, F, T), J) / len(X)).numpy()
        Hop = hessian_operator(model, X, y, case.loss, params, batch_size=4)
        Gop = ggn_operator(model, X, y, case.loss, params, batch_size=4, chunk_size=3)
        V = rng.standard_normal((H.shape[0], 7))
        np.testing.assert_allclose(Hop @ V[:, 0], H @ V[:, 0], atol=1e-12)
        np.testing.assert_allclose(Hop.matmat(V), H @ V, atol=1e-12)
        np.testing.assert_allclose(Gop.matmat(V), G @ V, atol=1e-12)
        np.testing.assert_allclose(Gop.rmatvec(V[:, 1]), G @ V[:, 1], atol=1e-12)
    f32 = hessian_operator(copy.deepcopy(model).float(), X.float(), y, case.loss,
                           dtype=np.float32)
    v = rng.standard_normal(H_full.shape[0])
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32 @ v, H_full @ v, rtol=1e-3, atol=1e-4)


def test_mse_accepts_ready_targets_and_batches_agree():
    model = _mlp(2, bn=False)
    X, _ = _data((5,), 2, n=10)
    Y = torch.randn(10, 2, dtype=DT)
    H_all = exact_hessian(model, X, Y, "mse")
    H_bat = exact_hessian(model, X, Y, "mse", batch_size=3)
    assert torch.allclose(H_all, H_bat, atol=1e-13)
    # independent: autograd on the written-out objective
    params = dict(model.named_parameters())
    names = list(params)

    def obj(*ts):
        out = functional_call(model, dict(zip(names, ts, strict=True)), (X,))
        return ((out - Y) ** 2).mean()
    ref = torch.autograd.functional.hessian(obj, tuple(p.detach() for p in params.values()))
    idx = _layout_index(model[5])
    w, b = names.index("5.weight"), names.index("5.bias")
    block = torch.cat([torch.cat([ref[w][w].reshape(8, 8), ref[w][b].reshape(8, 2)], 1),
                       torch.cat([ref[b][w].reshape(2, 8), ref[b][b].reshape(2, 2)], 1)])
    assert torch.allclose(H_all[-10:, -10:], block[idx][:, idx], atol=1e-12)


def test_errors_and_model_untouched():
    model = _mlp(3).float().train()
    X, y = _data((5,), 3)
    with pytest.raises(KfacboundError, match="max_params"):
        exact_hessian(model, X, y, "ce", max_params=10)
    with pytest.raises(KfacboundError, match="no module or parameter"):
        exact_hessian(model, X, y, "ce", ["nope"])
    with pytest.raises(KfacboundError, match="twice"):
        exact_hessian(model, X, y, "ce", ["1", "1.weight"])
    with pytest.raises(KfacboundError):
        exact_hessian(model, X, y[:3], "ce")
    H = exact_hessian(model, X, y, "ce")
    assert H.dtype == torch.float64
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_bare_layer_model_uses_layout():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(DT)
    X, y = _data((4,), 3)
    H = exact_hessian(lin, X, y, "ce")
    H_ref, _, _ = _reference(nn.Sequential(lin), X, y, "ce", ["0"])
    assert torch.allclose(H, H_ref, atol=1e-12)
