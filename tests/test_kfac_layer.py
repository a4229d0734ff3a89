"""KronLayer (matvec, dense, top-k Kronecker eigenpairs) against torch.kron + eigh; save/load."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kfacbound.curvature.kfac import KFACResult, compute_kfac
from kfacbound.curvature.kfac_layer import KronLayer
from kfacbound.curvature.layout import layer_vector, torch_to_layout_index
from kfacbound.errors import KfacboundError

DT = torch.float64


def _psd(n: int, rank: int | None, g: torch.Generator) -> torch.Tensor:
    B = torch.randn(n, rank or n, generator=g, dtype=DT)
    return B @ B.T


def _layer(out=3, cols=4, bias=True, homogeneous=True, seed=0, rank=None) -> KronLayer:
    g = torch.Generator().manual_seed(seed)
    G = _psd(out, rank, g)
    A = _psd(cols, rank, g)
    in_dim = cols - int(bias and homogeneous)
    Gb = _psd(out, None, g) if (bias and not homogeneous) else None
    if bias and not homogeneous:
        A = A[:in_dim, :in_dim]
    return KronLayer("fc", "Linear", G, A, (out, in_dim), bias, homogeneous=homogeneous, G_bias=Gb)


def _reference_dense(L: KronLayer) -> torch.Tensor:
    """Dense block built with torch.kron in torch order (W then b), permuted to the layout."""
    if L.homogeneous or not L.bias:
        return torch.kron(L.G, L.A)
    nw = L.out_dim * L.in_dim
    D = torch.zeros(L.dim, L.dim, dtype=DT)
    D[:nw, :nw] = torch.kron(L.G, L.A)
    D[nw:, nw:] = L.G_bias
    idx = torch_to_layout_index(nn.Linear(L.in_dim, L.out_dim))
    return D[idx][:, idx]


@pytest.mark.parametrize("bias,homogeneous", [(True, True), (True, False), (False, False)])
def test_matvec_dense_diag(bias, homogeneous):
    L = _layer(bias=bias, homogeneous=homogeneous)
    ref = _reference_dense(L)
    torch.testing.assert_close(L.to_dense(), ref)
    v = torch.randn(L.dim, dtype=DT)
    torch.testing.assert_close(L.matvec(v), ref @ v)
    V = torch.randn(L.dim, 5, dtype=DT)
    torch.testing.assert_close(L.matvec(V), ref @ V)
    torch.testing.assert_close(L.diag(), ref.diagonal())


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 5), cols=st.integers(2, 6), k=st.integers(1, 12),
       homogeneous=st.booleans(), seed=st.integers(0, 10_000), low_rank=st.booleans())
def test_topk_matches_eigh_of_kron(out, cols, k, homogeneous, seed, low_rank):
    L = _layer(out, cols, True, homogeneous, seed, rank=1 if low_rank else None)
    dense = _reference_dense(L)
    evals = torch.linalg.eigvalsh(dense).flip(0)
    top = L.topk(k)
    k = min(k, L.dim)
    assert len(top.values) == k and len(top.pairs) == k
    torch.testing.assert_close(top.values, evals[:k].clamp_min(0), atol=1e-9, rtol=1e-9)
    V = L.eigvecs(top)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=DT), atol=1e-9, rtol=0)
    torch.testing.assert_close(dense @ V, V * top.values, atol=1e-8, rtol=1e-8)


def test_to_dense_refuses_large():
    L = KronLayer("big", "Linear", torch.eye(100, dtype=DT), torch.eye(101, dtype=DT), (100, 100),
                  True)
    with pytest.raises(KfacboundError, match="big.*10100"):
        L.to_dense()
    # matvec still works without materialising
    v = torch.randn(L.dim, dtype=DT)
    torch.testing.assert_close(L.matvec(v), v)


def test_layout_matches_layer_vector():
    """matvec(vec(W̃)) acts on layout.layer_vector: a rank-one check with G, Ã = outer products."""
    lin = nn.Linear(3, 2).to(DT)
    u, a = torch.randn(2, dtype=DT), torch.randn(4, dtype=DT)
    L = KronLayer("l", "Linear", torch.outer(u, u), torch.outer(a, a), (2, 3), True)
    w = layer_vector(lin)
    # (u uᵀ ⊗ a aᵀ) vec(W̃) = (uᵀ W̃ a) · vec(u aᵀ)
    W = torch.cat([lin.weight, lin.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(L.matvec(w), (u @ W @ a) * torch.outer(u, a).reshape(-1))


@pytest.mark.parametrize("bias", ["homogeneous", "separate"])
def test_save_load_roundtrip(tmp_path, bias):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).to(DT).eval()
    X = torch.randn(6, 1, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    res = compute_kfac(model, (X, y), bias=bias, progress=False)
    path = res.save(tmp_path / "f.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    expected = {"0.G", "0.A", "4.G", "4.A", "1.ggn_diag_weight", "1.ggn_diag_bias"}
    if bias == "separate":
        expected |= {"0.G_bias", "4.G_bias"}
    assert keys == expected
    back = KFACResult.load(path)
    assert back.meta == res.meta
    for name in res:
        for attr in ("G", "A", "G_bias"):
            a, b = getattr(res[name], attr), getattr(back[name], attr)
            assert (a is None and b is None) or torch.equal(a, b)
        assert back[name].homogeneous == res[name].homogeneous
        assert back[name].weight_shape == res[name].weight_shape
    assert torch.equal(back.bn_diag["1"]["weight"], res.bn_diag["1"]["weight"])
    with pytest.raises(KfacboundError, match="not found"):
        KFACResult.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(KfacboundError):
        KFACResult.load(tmp_path / "junk")
