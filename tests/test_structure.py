"""Dissecting-Hessian structure (kfacbound.analysis.structure): overlaps, rank-1 ratios, mean-input
alignment and the report over BN and non-BN models, against independent computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kfacbound.analysis.structure import (
    abs_cos,
    analyse_model,
    expected_outliers,
    format_summary,
    layer_input_means,
    rank1_ratio,
    structure_report,
)
from kfacbound.curvature.kfac import compute_kfac
from kfacbound.curvature.spectral import eigenspace_overlap, overlap_curve
from kfacbound.errors import KfacboundError
from kfacbound.models import build_model, resolve_spec


def _mlp(seed, bn=False, widths=(6,), activation="relu", d=5, C=3):
    spec = resolve_spec({"arch": "fc", "widths": list(widths), "bn": bn,
                         "activation": activation}, input_shape=[d], num_outputs=C)
    model = build_model(spec, seed=seed)
    if bn:  # non-trivial running statistics and affine parameters
        g = torch.Generator().manual_seed(seed + 100)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.double().eval()


def _data(n=30, d=5, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64), torch.randint(0, C, (n,),
                                                                           generator=g)


def test_rank1_ratio():
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(4), rng.standard_normal(7)
    assert rank1_ratio(np.kron(u, v), (4, 7)) == pytest.approx(1.0, abs=1e-12)
    assert rank1_ratio(np.diag([3.0, 4.0]).reshape(-1), (2, 2)) == pytest.approx(16 / 25)
    # identity-like matrix: all singular values equal -> 1/min(out, cols)
    assert rank1_ratio(np.eye(3, 5).reshape(-1), (3, 5)) == pytest.approx(1 / 3)
    assert rank1_ratio(rng.standard_normal(28), (4, 7)) < 0.95
    assert abs_cos([1, 0], [-2, 0]) == pytest.approx(1.0)
    assert abs_cos([1, 0], [0, 3]) == pytest.approx(0.0)


def test_overlap_identity_and_random_baseline():
    rng = np.random.default_rng(1)
    n, k = 400, 10
    Q = np.linalg.qr(rng.standard_normal((n, k)))[0]
    assert eigenspace_overlap(Q, Q @ np.linalg.qr(rng.standard_normal((k, k)))[0]) == \
        pytest.approx(1.0, abs=1e-12)  # same subspace, rotated basis
    vals = [eigenspace_overlap(np.linalg.qr(rng.standard_normal((n, k)))[0],
                               np.linalg.qr(rng.standard_normal((n, k)))[0]) for _ in range(200)]
    # E = k/n exactly for Haar-random subspaces; standard error of the mean ≈ 2e-4
    assert np.mean(vals) == pytest.approx(k / n, rel=0.1)


def test_layer_input_means_match_kfac_factor_and_direct():
    """E[ã] from hooks equals the last row of K-FAC's Ã (= E[ã·1]) and, for the first layer,
    the data mean with a 1 appended; the conv case against F.unfold by hand."""
    model = _mlp(0, bn=True)
    X, y = _data()
    means = layer_input_means(model, X, batch_size=7)
    kfac = compute_kfac(model, (X, y), "ce", "kflr", progress=False)
    np.testing.assert_allclose(means["fc1"], np.append(X.mean(0).numpy(), 1.0), rtol=1e-12)
    for name in ("fc1", "out"):
        np.testing.assert_allclose(means[name], kfac[name].A[-1].numpy(), rtol=1e-10, atol=1e-12)

    spec = resolve_spec({"arch": "cnn", "channels": [2], "kernel": 3, "padding": 1, "widths": []},
                        input_shape=[1, 5, 5], num_outputs=3)
    cnn = build_model(spec, seed=0).double().eval()
    Xc = torch.rand(4, 1, 5, 5, dtype=torch.float64)
    mc = layer_input_means(cnn, Xc)
    patches = F.unfold(Xc, 3, padding=1)  # [N, 9, 25]
    np.testing.assert_allclose(mc["conv1"], np.append(patches.mean((0, 2)).numpy(), 1.0))
    assert mc["out"].shape == (2 * 2 * 2 + 1,)


def test_analyse_model_rank1_alignment_outliers():
    model = _mlp(0)
    X, y = _data()
    res = analyse_model(model, X, y, "ce", k=4)
    assert res["expected_outliers"] == 2 and not res["bn"]
    assert expected_outliers("bce", 1) == 1 and expected_outliers("mse", 4) == 4
    for lay in res["layers"].values():
        assert lay["method"] == "dense" and len(lay["rank1"]) == 4
        # K-FAC eigenvectors are Kronecker vectors: rank-1 ratio exactly 1
        np.testing.assert_allclose(lay["rank1_kfac"], 1.0, atol=1e-10)
        assert all(0 < r <= 1 + 1e-12 for r in lay["rank1"])
        assert 0 <= lay["align_A_mean"] <= 1 + 1e-12
        assert len(lay["exact_eigenvalues"]) >= 2 * 2 + 2  # enough to see a gap after C − 1
        assert isinstance(lay["outliers_exact"], int)
    # non-negative inputs (uniform data): A ≈ E[a]E[a]ᵀ-dominated, alignment near 1
    assert res["layers"]["fc1"]["align_A_mean"] > 0.9


def test_report_identical_models_overlap_one_and_groups():
    X, y = _data()
    a = _mlp(0)
    models = [("a", a), ("a-copy", copy.deepcopy(a)), ("b", _mlp(1)),
              ("bn0", _mlp(0, bn=True)), ("bn1", _mlp(1, bn=True))]
    rep = structure_report(models, (X, y), "ce", k=4, progress=False)
    pair = [p for p in rep["pairs"] if {p["a"], p["b"]} == {"a", "a-copy"}]
    assert len(pair) == 2  # fc1 and out
    for p in pair:
        np.testing.assert_allclose(p["exact"], 1.0, atol=1e-8)
        np.testing.assert_allclose(p["kfac"], 1.0, atol=1e-8)
    assert len(rep["pairs"]) == 10 * 2
    groups = {r["group"] for r in rep["summary"]}
    assert groups == {"bn", "no-bn", "bn-vs-no-bn"}
    # the pairwise curves equal a direct overlap of the per-model bases
    row = next(p for p in rep["pairs"] if p["a"] == "b" and p["b"] == "bn0" and
               p["layer"] == "out")
    assert row["group"] == "bn-vs-no-bn" and len(row["exact"]) == 4
    assert all(0 <= v <= 1 + 1e-9 for v in row["exact"] + row["kfac"])
    text = format_summary(rep["summary"])
    assert "no-bn" in text and "fc1" in text
    assert "_V_exact" not in rep["models"][0]["layers"]["fc1"]


def test_report_exact_overlap_against_dense_eigh():
    """Pair overlap curve equals one computed from numpy eigh of the dense exact blocks."""
    from kfacbound.curvature.exact import layer_hessian

    X, y = _data()
    m0, m1 = _mlp(0, activation="tanh"), _mlp(1, activation="tanh")
    rep = structure_report([("m0", m0), ("m1", m1)], (X, y), "ce", layers=["fc1"], k=3,
                           dense_limit=0, progress=False)  # Lanczos path
    V = []
    for m in (m0, m1):
        H = layer_hessian(m, X, y, "ce", "fc1").numpy()
        V.append(np.linalg.eigh(H)[1][:, ::-1][:, :3])
    ref = overlap_curve(V[0], V[1])
    np.testing.assert_allclose(rep["pairs"][0]["exact"], [ref[j] for j in (1, 2, 3)], atol=1e-5)


def test_shape_mismatch_errors():
    X, y = _data()
    small, wide = _mlp(0, widths=(4,)), _mlp(0, widths=(6,))
    with pytest.raises(KfacboundError, match="different shapes"):
        structure_report([("s", small), ("w", wide)], (X, y), layers=["fc1"], progress=False)
    # default layers: nothing of equal shape -> a clear error
    with pytest.raises(KfacboundError, match="equal shape"):
        structure_report([("s", small), ("w", wide)], (X, y), progress=False)
    with pytest.raises(KfacboundError, match="distinct"):
        structure_report([("s", small), ("s", small)], (X, y), progress=False)


def test_relative_frobenius_of_kfac_against_dense_hessian():
    """rel_frobenius = ‖H − G⊗Ã‖_F/‖H‖_F with H from autograd and G⊗Ã formed by torch.kron
    from the factors here (dense path), and the Rademacher estimate on the Lanczos path."""
    from kfacbound.curvature.exact import layer_hessian

    model = _mlp(0, activation="tanh")
    X, y = _data()
    kfac = compute_kfac(model, (X, y), "ce", "kflr", progress=False)
    H = layer_hessian(model, X, y, "ce", "fc1").numpy()
    G, A = kfac["fc1"].G.double(), kfac["fc1"].A.double()
    K = torch.kron(G, A).numpy()
    ref = np.linalg.norm(H - K) / np.linalg.norm(H)
    dense = analyse_model(model, X, y, "ce", k=3, kfac=kfac)["layers"]["fc1"]
    assert dense["rel_frobenius_method"] == "dense"
    assert dense["rel_frobenius"] == pytest.approx(ref, rel=1e-8)
    est = analyse_model(model, X, y, "ce", k=3, kfac=kfac, dense_limit=0)["layers"]["fc1"]
    assert est["rel_frobenius_method"].startswith("hutchinson")
    assert est["rel_frobenius"] == pytest.approx(ref, rel=0.5)  # a 10-probe estimate
