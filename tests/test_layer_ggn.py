"""The layer-local GGN operator and the exact-block operator's routes, against float64
autograd references (torch.autograd.functional.hessian / jacobian in test_exact._reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kfacbound.curvature.layer_ggn import LayerGGN, exact_block_operator
from kfacbound.curvature.operators import CurvatureProblem
from kfacbound.errors import KfacboundError

from .conftest import over_cases
from .test_exact import DT, _lambda, _one_thread, _reference  # noqa: F401 (autouse fixture)


def _layers(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


@over_cases()
def test_layer_ggn_products_match_the_autograd_ggn_block(case, monkeypatch):
    import kfacbound.curvature.layer_ggn as lg
    import kfacbound.curvature.operators as operators

    monkeypatch.setattr(lg, "SETUP_BATCH", 4)  # 9 examples: chunks of 4, 4, 1
    model = case.model()
    X, y = case.data(9)
    with torch.no_grad():
        F = model(X).reshape(len(X), -1)
    for layer in _layers(model):
        H_ref, J, T = _reference(model, X, y, case.loss, [layer])
        G_ref = torch.einsum("ncp,ncd,ndq->pq", J, _lambda(case.loss, F, T), J) / len(X)
        problem = CurvatureProblem(model, X, y, case.loss, [layer], batch_size=5)
        ggn = LayerGGN(problem)
        V = torch.randn(problem.p, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(ggn.matmat(V), G_ref @ V, atol=1e-12, rtol=1e-10), layer
        assert torch.allclose(ggn.matmat(V[:, 0]), G_ref @ V[:, 0], atol=1e-12), layer
        with monkeypatch.context() as m:
            m.setattr(lg, "DENSE_CHUNK_MEMORY", 1)  # one example per chunk
            dense = LayerGGN(problem, keep=False).dense()
        assert torch.allclose(dense, G_ref, atol=1e-12, rtol=1e-10), layer
        assert torch.allclose(LayerGGN(problem, keep=False).dense(), G_ref, atol=1e-12,
                              rtol=1e-10), layer
        # the route for H: layer-local exactly where H equals its GGN block on this layer
        op = exact_block_operator(model, X, y, case.loss, layer, "H", route="layer-ggn")
        equal = bool((H_ref - G_ref).abs().max() <= 1e-12 * H_ref.abs().max())
        assert op.route == ("layer-ggn" if equal else "hvp"), layer
        Z = np.random.default_rng(1).standard_normal((problem.p, 2))
        assert np.allclose(op.matmat(Z), H_ref.numpy() @ Z, atol=1e-12, rtol=1e-10), layer
        op_o = exact_block_operator(model, X, y, case.loss, layer, "H_O", route="layer-ggn")
        assert op_o.route == "layer-ggn"
        assert np.allclose(op_o.matmat(Z), G_ref.numpy() @ Z, atol=1e-12, rtol=1e-10), layer
        auto = exact_block_operator(model, X, y, case.loss, layer, "H")
        conv = isinstance(dict(model.named_modules())[layer], nn.modules.conv._ConvNd)
        assert auto.route == ("layer-ggn" if conv and equal else "hvp"), layer
        with monkeypatch.context() as m:  # no room for the gradient graph: Linear layers too
            m.setattr(operators, "GRAPH_MEMORY", 0)
            tight = exact_block_operator(model, X, y, case.loss, layer, "H")
        assert tight.route == ("layer-ggn" if equal else "hvp"), layer
        assert np.allclose(tight.matmat(Z), H_ref.numpy() @ Z, atol=1e-12, rtol=1e-10), layer


@over_cases(where=lambda c: c.name == "resnet")
def test_memory_budget_and_shared_weights_fall_back_or_fail_clearly(case):
    model = case.model()
    X, y = case.data(6)
    layer = _layers(model)[1]
    assert exact_block_operator(model, X, y, "ce", layer, "H", memory=0).route == "hvp"
    assert exact_block_operator(model, X, y, "ce", layer, "H_O", memory=0).route == "ggnvp"
    assert exact_block_operator(model, X, y, "ce", layer, "H", route="hvp").route == "hvp"
    with pytest.raises(KfacboundError, match="route must be"):
        exact_block_operator(model, X, y, "ce", layer, "H", route="fast")
    shared = nn.Linear(3, 3).to(DT)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    Xs = torch.randn(5, 3, dtype=DT)
    with pytest.raises(KfacboundError, match="more than once"):
        LayerGGN(CurvatureProblem(twice, Xs, torch.arange(5) % 3, "ce", ["0"]))
    # the dense GGN of a shared layer falls back to per-example Jacobians of the network
    from kfacbound.curvature.exact import _dense_ggn

    ys = torch.arange(5) % 3
    dense = _dense_ggn(CurvatureProblem(twice, Xs, ys, "ce", ["0"]), False)
    _, J, T = _reference(twice, Xs, ys, "ce", ["0"])
    with torch.no_grad():
        F = twice(Xs)
    G_ref = torch.einsum("ncp,ncd,ndq->pq", J, _lambda("ce", F, T), J) / 5
    assert torch.allclose(dense, G_ref, atol=1e-12, rtol=1e-10)
    with pytest.raises(KfacboundError, match="exactly one"):
        LayerGGN(CurvatureProblem(model, X, y, "ce", _layers(model)[:2]))


def _tied() -> nn.Module:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    return nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(3, 4))


@pytest.mark.parametrize("name", ["same-padding conv", "linear on 3-d inputs", "tied weights"])
def test_layers_the_input_rows_do_not_describe_fall_back_to_network_jacobians(name):
    """Dense H_O of layer "0" against the autograd reference where LayerGGN.dense must not be
    used (string conv padding, a Linear on [N, L, in] inputs, weights tied to another
    module): the fallback gives the exact block, and the operator route avoids layer-ggn."""
    from kfacbound.curvature.exact import _dense_ggn

    torch.manual_seed(0)
    if name == "same-padding conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 4))
        X = torch.randn(6, 2, 5, 5, dtype=DT)
    elif name == "linear on 3-d inputs":
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2, 4))
        X = torch.randn(6, 2, 4, dtype=DT)
    else:
        model = _tied()
        X = torch.randn(6, 3, dtype=DT)
    model = model.to(DT)
    y = torch.arange(6) % 4
    dense = _dense_ggn(CurvatureProblem(model, X, y, "ce", ["0"]), False)
    _, J, T = _reference(model, X, y, "ce", ["0"])
    with torch.no_grad():
        F = model(X)
    G_ref = torch.einsum("ncp,ncd,ndq->pq", J, _lambda("ce", F, T), J) / len(X)
    assert torch.allclose(dense, G_ref, atol=1e-12, rtol=1e-10)
    if name == "tied weights":
        op = exact_block_operator(model, X, y, "ce", "0", "H_O", route="layer-ggn")
        assert op.route == "ggnvp"
        Z = np.random.default_rng(0).standard_normal((G_ref.shape[0], 2))
        assert np.allclose(op.matmat(Z), G_ref.numpy() @ Z, atol=1e-12)
