"""Layer spectra (kfacbound.analysis.spectra) against a dense eigh of the layer Hessian computed
in the test with torch.autograd.functional.hessian, and the SLQ estimates against the same."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfacbound.analysis.spectra import (
    checkpoint_epoch,
    layer_spectrum,
    slq_metrics,
    spectra_series,
    top_outliers,
    write_csv,
)
from kfacbound.models import build_model, resolve_spec


def _model_data(seed=0, n=40, width=8):
    spec = resolve_spec({"arch": "fc", "widths": [width], "activation": "tanh"}, input_shape=[6],
                        num_outputs=3)
    model = build_model(spec, seed=seed).double().eval()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def _dense_eigs(model, X, y, layer="fc1"):
    m = dict(model.named_modules())[layer]
    out, inp = m.weight.shape
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(theta):
        Wt = theta.reshape(out, inp + 1)
        p = dict(params, **{f"{layer}.weight": Wt[:, :inp], f"{layer}.bias": Wt[:, inp]})
        return nn.functional.cross_entropy(functional_call(model, p, (X,)), y)

    theta = torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).reshape(-1)
    H = torch.autograd.functional.hessian(loss, theta).numpy()
    return np.sort(np.linalg.eigvalsh((H + H.T) / 2))[::-1]


def test_dense_metrics_match_eigh():
    model, X, y = _model_data()
    lam = _dense_eigs(model, X, y)
    res = layer_spectrum(model, X, y, "ce", "fc1", k=5)
    assert res["method"] == "dense" and res["dim"] == lam.size
    tol = np.abs(lam).max() * lam.size * np.finfo(float).eps
    pos, neg = lam[lam > tol], lam[lam < -tol]
    assert neg.size > 0  # tanh first layer: the functional Hessian gives negative eigenvalues
    pi = pos / pos.sum()
    expected = {
        "top": lam[0], "trace": lam.sum(), "effective_rank": np.exp(-(pi * np.log(pi)).sum()),
        "stable_rank": pos.sum() / pos.max(),
        "negative_mass": np.abs(neg).sum() / np.abs(lam).sum(),
        "negative_fraction": neg.size / lam.size, "condition_number": pos.max() / pos.min(),
    }
    for key, value in expected.items():
        assert res[key] == pytest.approx(value, rel=1e-7), key
    np.testing.assert_allclose(res["top_eigenvalues"], lam[:5], rtol=1e-8, atol=1e-12)
    grid, dens = np.asarray(res["density"]["grid"]), np.asarray(res["density"]["density"])
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    # broadened density's mean is the mean eigenvalue
    assert np.trapezoid(dens * grid, grid) == pytest.approx(lam.mean(), rel=1e-3, abs=1e-6)


def test_slq_estimates_match_eigh():
    model, X, y = _model_data(width=4)
    lam = _dense_eigs(model, X, y)
    p = lam.size
    # p = 28 Lanczos steps: each probe's quadrature is exact, the error is the probes' sampling
    res = layer_spectrum(model, X, y, "ce", "fc1", dense_limit=0, k=5, slq_probes=12,
                         slq_steps=p, hutchinson_samples=64)
    assert res["method"] == "slq" and res["condition_number"] is None
    np.testing.assert_allclose(res["top_eigenvalues"], lam[:5], rtol=1e-6)
    assert abs(res["trace"] - lam.sum()) < 4 * res["trace_se"] + 1e-9
    tol = 1e-6 * np.abs(lam).max()
    neg = lam[lam < -tol]
    assert res["negative_fraction"] == pytest.approx(neg.size / p, abs=0.12)
    assert res["negative_mass"] == pytest.approx(np.abs(neg).sum() / np.abs(lam).sum(), abs=0.1)
    pos = lam[lam > tol]
    assert res["stable_rank"] == pytest.approx(pos.sum() / pos.max(), rel=0.25)
    pi = pos / pos.sum()
    assert res["effective_rank"] == pytest.approx(np.exp(-(pi * np.log(pi)).sum()), rel=0.3)
    grid, dens = np.asarray(res["density"]["grid"]), np.asarray(res["density"]["density"])
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-2)


def test_slq_metrics_exact_when_nodes_are_eigenvalues():
    """With nodes = the eigenvalues and weights 1/p, the SLQ formulas are the exact metrics."""
    lam = np.array([5.0, 2.0, 1.0, 0.5, 0.0, -0.25, -1.0])
    p = lam.size
    out = slq_metrics(lam[None], np.full((1, p), 1 / p), p, top=5.0)
    pos = lam[lam > 0]
    pi = pos / pos.sum()
    assert out["negative_fraction"] == pytest.approx(2 / 7)
    assert out["negative_mass"] == pytest.approx(1.25 / np.abs(lam).sum())
    assert out["stable_rank"] == pytest.approx(pos.sum() / 5)
    assert out["effective_rank"] == pytest.approx(np.exp(-(pi * np.log(pi)).sum()))
    assert out["num_negative"] == pytest.approx(2)


def test_series_orders_by_epoch_and_writes_csv(tmp_path):
    m0, X, y = _model_data(0)
    m1, _, _ = _model_data(1)
    ckpts = [("run-epoch004.kfb", m1, {"metrics": {"epoch": 4, "train_error": 0.1,
                                                   "test_error": 0.2}}),
             ("run-epoch002.kfb", m0, None)]
    assert checkpoint_epoch("run-epoch002.kfb", None, 0) == 2
    res = spectra_series(ckpts, (X, y), "ce", progress=False)
    assert [r["epoch"] for r in res["rows"]] == [2, 2, 4, 4]
    assert [r["layer"] for r in res["rows"]] == ["fc1", "out"] * 2
    assert res["rows"][2]["test_error"] == 0.2 and res["rows"][0]["test_error"] is None
    lam = _dense_eigs(m1, X, y)
    assert res["rows"][2]["top"] == pytest.approx(lam[0], rel=1e-8)
    assert len(res["densities"]) == 4
    path = write_csv(res["rows"], tmp_path / "s.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 4 and rows[0]["test_error"] == "" and float(rows[2]["epoch"]) == 4


def test_top_outliers_ignores_numerical_null_space():
    lam = [10.0, 9.0, 1.0, 0.9, 0.8, 0.7, 1e-17, 3e-18, -1e-17]
    assert top_outliers(lam, 20) == 2  # the gap 9 -> 1, not 0.7 -> 1e-17
    assert top_outliers([1.0, 0.9, 0.8, 0.7], 20) == 0  # smooth decay: none
    assert top_outliers(lam, 2) == 0  # only the top 2 are searched: no gap inside them
