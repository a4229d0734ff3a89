"""Exact against K-FAC (kfacbound.analysis.compare) checked against an independent computation:
the layer Hessian by torch.autograd.functional.hessian, the GGN from autograd Jacobians and the
closed-form cross-entropy Λ, K-FAC's spectrum by numpy eigh of torch.kron(G, A)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfacbound.analysis.compare import compare_layer, compare_model, format_table
from kfacbound.curvature.kfac import compute_kfac
from kfacbound.errors import KfacboundError
from kfacbound.models import build_model, resolve_spec


def _setup(activation="tanh", n=24, seed=0, bn=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    spec = resolve_spec({"arch": "fc", "widths": [4], "activation": activation, "bn": bn},
                        input_shape=[5], num_outputs=3)
    model = build_model(spec, seed=seed).double().eval()
    return model, X, y


def _layer_loss_fn(model, X, y, layer):
    """Mean cross-entropy as a function of the layer's vec([W | b]) (row-major)."""
    module = dict(model.named_modules())[layer]
    out, inp = module.weight.shape
    params = {k: v.detach() for k, v in model.named_parameters()}

    def outputs(theta):
        Wt = theta.reshape(out, inp + 1)
        p = dict(params)
        p[f"{layer}.weight"] = Wt[:, :inp]
        p[f"{layer}.bias"] = Wt[:, inp]
        return functional_call(model, p, (X,))

    def loss(theta):
        return nn.functional.cross_entropy(outputs(theta), y)

    theta0 = torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1).reshape(-1)
    return loss, outputs, theta0


def _reference(model, X, y, layer):
    """Dense H (autograd hessian) and H_O = (1/n) Σ J_iᵀ (diag p − p pᵀ) J_i, independently."""
    loss, outputs, theta0 = _layer_loss_fn(model, X, y, layer)
    H = torch.autograd.functional.hessian(loss, theta0).numpy()
    J = torch.autograd.functional.jacobian(outputs, theta0)  # (n, C, p)
    P = torch.softmax(outputs(theta0), dim=1).detach()
    Lam = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    H_O = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J).numpy() / len(X)
    return (H + H.T) / 2, (H_O + H_O.T) / 2


def _top(M, k):
    w, V = np.linalg.eigh(M)
    return w[::-1][:k], V[:, ::-1][:, :k]


def _overlap_curve(V1, V2):
    return [np.linalg.norm(V1[:, :j].T @ V2[:, :j]) ** 2 / j for j in range(1, V1.shape[1] + 1)]


@pytest.mark.parametrize("dense_limit", [10_000, 0])  # dense eigh, then Lanczos
def test_compare_layer_matches_direct_computation(dense_limit):
    model, X, y = _setup("tanh")
    kfac = compute_kfac(model, (X, y), "ce", "kflr", progress=False)
    k = 6
    for layer in ("fc1", "out"):
        H, H_O = _reference(model, X, y, layer)
        G, A = kfac[layer].G, kfac[layer].A
        K = torch.kron(G, A).numpy()
        kv, KV = _top(K, k)
        res = compare_layer(model, X, y, "ce", layer, kfac[layer], k, dense_limit=dense_limit,
                            frob_probes=0)
        assert res["method"] == ("dense" if dense_limit else "lanczos")
        assert res["dim"] == H.shape[0] and res["k"] == k
        np.testing.assert_allclose(res["kfac"]["eigenvalues"], kv, rtol=1e-10, atol=1e-14)
        for part, M in (("H", H), ("H_O", H_O)):
            ev, EV = _top(M, k)
            np.testing.assert_allclose(res["exact"][part], ev, rtol=1e-6, atol=1e-10)
            np.testing.assert_allclose(res["overlap"][part], _overlap_curve(EV, KV), atol=1e-5)
            frob = res["rel_frobenius"][part]
            if dense_limit:
                assert frob["method"] == "dense"
                np.testing.assert_allclose(frob["value"],
                                           np.linalg.norm(M - K) / np.linalg.norm(M), rtol=1e-8)
            else:
                assert frob is None  # no probes asked for
        np.testing.assert_allclose(res["random_overlap"][-1], k / H.shape[0])


def test_tanh_hessian_differs_from_ggn_relu_equal():
    """A sanity anchor of the reference: for ReLU the layer block of H equals its GGN block, for
    tanh (first layer) it does not; compare_layer reports the same."""
    for act, equal in (("relu", True), ("tanh", False)):
        model, X, y = _setup(act)
        kfac = compute_kfac(model, (X, y), "ce", "kflr", progress=False)
        res = compare_layer(model, X, y, "ce", "fc1", kfac["fc1"], 4)
        same = np.allclose(res["exact"]["H"], res["exact"]["H_O"], rtol=1e-8, atol=1e-12)
        assert same == equal


def test_frobenius_estimate_for_large_blocks():
    """The Hutchinson estimate of ‖H − G⊗A‖_F/‖H‖_F is close to the exact value."""
    model, X, y = _setup("tanh")
    kfac = compute_kfac(model, (X, y), "ce", "kflr", progress=False)
    H, _ = _reference(model, X, y, "fc1")
    K = kfac["fc1"].to_dense().numpy()
    exact = np.linalg.norm(H - K) / np.linalg.norm(H)
    res = compare_layer(model, X, y, "ce", "fc1", kfac["fc1"], 2, parts=("H",), dense_limit=0,
                        frob_probes=400)
    est = res["rel_frobenius"]["H"]
    assert est["method"] == "hutchinson-400"
    assert abs(est["value"] - exact) < 0.15 * exact


def test_single_example_kflr_is_exact_for_ggn():
    """KFLR on one example equals the GGN block: relative error 0 and overlap 1 (H_O)."""
    model, X, y = _setup("relu", n=1)
    res = compare_model(model, (X, y), "ce", k=3, progress=False)
    for row in res["layers"]:
        assert row["rel_frobenius"]["H_O"]["value"] < 1e-10
        # GGN rank is C − 1 = 2 for one example: the top-2 eigenspace is determined
        assert row["overlap"]["H_O"][1] == pytest.approx(1.0, abs=1e-8)


def test_compare_model_bn_cnn_runs_and_formats():
    torch.manual_seed(0)
    X = torch.randn(16, 1, 6, 6)
    y = torch.randint(0, 3, (16,))
    spec = resolve_spec({"arch": "cnn", "channels": [2], "kernel": 3, "widths": [4], "bn": True},
                        input_shape=[1, 6, 6], num_outputs=3)
    model = build_model(spec, seed=1).eval()
    res = compare_model(model, (X, y), k=4, layers=["conv1", "out"], progress=False)
    assert [r["layer"] for r in res["layers"]] == ["conv1", "out"]
    assert res["meta"]["loss"] == "ce" and res["meta"]["conv_convention"] == "kfc-expand"
    for row in res["layers"]:
        assert all(-1e-9 <= v <= 1 + 1e-9 for v in row["overlap"]["H"])
        assert row["rel_frobenius"]["H"]["value"] >= 0
    text = format_table(res)
    assert "conv1" in text and "K-FAC" in text
    with pytest.raises(KfacboundError, match="no Linear/Conv2d layer named 'fc9'"):
        compare_model(model, (X, y), layers=["fc9"], progress=False)
