"""Optimised curvature paths (issue 11) against independent references.

- half-flop Gram products (factors.gram_upper_, add_gram) and the strided conv patch Gram
  (the Conv2d rule's input_factor) and conv output Gram against dense float64 brute force via
  F.unfold;
- one backward per square-root column against one vmapped backward (kfac.BATCHED_COLUMNS);
- the closed-form MLP Hessian (exact._mlp_hessian) against torch.func.hessian in float64;
- Hessian-vector products through a cached gradient graph against the dense Hessian.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import kfacbound.curvature.kfac as K
from kfacbound.curvature import factors
from kfacbound.curvature.exact import _dense_hessian, exact_hessian, mlp_layers
from kfacbound.curvature.layout import torch_to_layout_index
from kfacbound.curvature.modules import rule_for
from kfacbound.curvature.operators import CurvatureProblem, hessian_operator


@pytest.mark.parametrize("d", [5, 130, 300])
def test_gram_upper_matches_dense_product(d):
    g = torch.Generator().manual_seed(d)
    M = torch.randn(257, d, generator=g, dtype=torch.float64)
    S = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = S + S.T  # a symmetric earlier sum
    out = K._gram_upper_(S.clone(), M, alpha=0.5)
    torch.testing.assert_close(out, S + 0.5 * M.T @ M, rtol=1e-12, atol=1e-12)
    out32 = K._add_gram(torch.zeros(d, d, dtype=torch.float64), M.float())
    torch.testing.assert_close(out32, M.T @ M, rtol=1e-5, atol=1e-3)



@pytest.mark.parametrize("d", [5, 130, 300])
def test_upper_triangle_sums_complete_to_the_dense_gram(d):
    """Batches summed with upper=True (no per-batch mirror copies), completed once by
    symmetrize_upper_, give Σ_b M_bᵀ M_b; float32 chunks into a float64 sum likewise."""
    g = torch.Generator().manual_seed(d)
    Ms = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (97, 64, 31)]
    out = torch.zeros(d, d, dtype=torch.float64)
    out32 = torch.zeros(d, d, dtype=torch.float64)
    for M in Ms:
        factors.gram_upper_(out, M, upper=True)
        factors.add_gram(out32, M.float(), upper=True)
    ref = sum(M.T @ M for M in Ms)
    if d > factors.GRAM_BLOCK:  # the lower blocks were really left out
        assert not torch.allclose(out, ref)
    torch.testing.assert_close(factors.symmetrize_upper_(out), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors.symmetrize_upper_(out32), ref, rtol=1e-5, atol=1e-3)

@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2),
                                stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
                                dict(kernel_size=1)])
def test_conv_factors_match_unfold_brute_force(kw, monkeypatch):
    conv = nn.Conv2d(3, 4, **kw).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 9, 8, generator=g, dtype=torch.float64)
    u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                 stride=conv.stride)  # [N, D, T]
    T = u.shape[-1]
    # the rule's input rows are F.unfold's patches, position by position
    assert torch.equal(rule_for(conv).unfold(conv, x), u.transpose(1, 2))
    rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    ref = rows.T @ rows / T
    for chunk in (factors.GRAM_CHUNK, 2 * T):  # one chunk, and several
        monkeypatch.setattr(factors, "GRAM_CHUNK", chunk)
        torch.testing.assert_close(K.input_factor(conv, x), ref, rtol=1e-12, atol=1e-12)
        out = conv(x)
        grads = torch.randn((2, *out.shape), generator=g, dtype=torch.float64)
        gr = grads.flatten(3).transpose(2, 3).reshape(-1, out.shape[1])
        torch.testing.assert_close(K.output_factor(conv, grads), gr.T @ gr,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin, kw, shape", [
    (1, dict(kernel_size=5, padding=2), (6, 28, 28)),  # LeNet-5's conv1
    (6, dict(kernel_size=5), (5, 14, 14)),  # LeNet-5's conv2
    (3, dict(kernel_size=(5, 4), padding=(1, 3), bias=False), (4, 9, 11)),
    (2, dict(kernel_size=(4, 6), padding=(0, 2)), (3, 7, 12)),
])
def test_correlation_patch_gram_matches_unfold_brute_force(cin, kw, shape):
    """The correlation route of the conv input factor (5×5 and larger kernels at stride 1):
    against F.unfold's patches in float64, from float32 and float64 inputs, in one chunk of
    examples and in several."""
    conv = nn.Conv2d(cin, 4, **kw)
    N, H, W = shape
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(N, cin, H, W, generator=g, dtype=torch.float64)
    assert factors.correlation_pays(cin, conv.kernel_size, conv.stride, conv.dilation,
                                    (H + 2 * conv.padding[0], W + 2 * conv.padding[1]), 4)
    u = F.unfold(x, conv.kernel_size, padding=conv.padding)
    T = u.shape[-1]
    rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    ref = rows.T @ rows / T
    torch.testing.assert_close(K.input_factor(conv.double(), x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.input_factor(conv.float(), x.float()), ref, rtol=1e-5,
                               atol=1e-4)
    xp = F.pad(x, [p for p in reversed(conv.padding) for _ in (0, 1)])
    chunked = factors.patch_gram_correlation(xp, conv.kernel_size, conv.bias is not None,
                                             chunk=2)
    torch.testing.assert_close(chunked / T, ref, rtol=1e-12, atol=1e-12)
    # two batches into one accumulator, upper triangle only, completed once
    acc = K.input_factor(conv.double(), x[:2], upper=True)
    K.input_factor(conv, x[2:], acc, upper=True)
    torch.testing.assert_close(factors.symmetrize_upper_(acc), ref, rtol=1e-12, atol=1e-12)


def test_correlation_route_is_taken_only_where_it_pays():
    big = (32, 32)
    assert factors.correlation_pays(6, (5, 5), (1, 1), (1, 1), big, 4)
    assert not factors.correlation_pays(16, (3, 3), (1, 1), (1, 1), big, 4)  # 9 taps
    assert not factors.correlation_pays(6, (5, 5), (2, 2), (1, 1), big, 4)  # strided
    assert not factors.correlation_pays(6, (5, 5), (1, 1), (2, 2), big, 4)  # dilated
    assert not factors.correlation_pays(6, (5, 5, 5), (1,) * 3, (1,) * 3, (8,) * 3, 4)  # 3-D
    assert not factors.correlation_pays(256, (5, 5), (1, 1), (1, 1), big, 4)  # memory


@pytest.mark.parametrize("method", ["kflr", "kfac"])
def test_column_loop_equals_batched_backward(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 7),
                          nn.Tanh(), nn.Linear(7, 5)).double()
    X = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    res = {}
    old = K.BATCHED_COLUMNS
    try:
        for batched in (True, False):
            K.BATCHED_COLUMNS = batched
            res[batched] = K.compute_kfac(model, (X, y), method=method, mc_samples=3,
                                          batch_size=5, progress=False)
    finally:
        K.BATCHED_COLUMNS = old
    for name in res[True]:
        torch.testing.assert_close(res[True][name].G, res[False][name].G, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(res[True][name].A, res[False][name].A, rtol=1e-10,
                                   atol=1e-12)


def _func_hessian(model, X, T, loss):
    """torch.func.hessian of the mean loss over all parameters, permuted to the layout."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def objective(vec):
        state, s = {}, 0
        for n, sh in zip(names, shapes, strict=True):
            state[n] = vec[s:s + sh.numel()].reshape(sh)
            s += sh.numel()
        return loss(functional_call(model, state, (X,)), T)

    idx, off = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            idx.append(torch_to_layout_index(m) + off)
            off += sum(q.numel() for q in m.parameters(recurse=False))
    idx = torch.cat(idx)
    return torch.func.hessian(objective)(theta)[idx][:, idx]


@pytest.mark.parametrize("act,loss,C", [(nn.Tanh, "ce", 4), (nn.ReLU, "mse", 3),
                                        (nn.Sigmoid, "bce", 1)])
def test_mlp_closed_form_hessian_matches_func_hessian(act, loss, C):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4, bias=False),
                          act(), nn.Linear(4, C)).double()
    X = torch.randn(23, 6, dtype=torch.float64)
    y = torch.randint(0, max(C, 2), (23,))
    H = exact_hessian(model, X, y, loss, batch_size=10)
    problem = CurvatureProblem(model, X, y, loss)
    assert mlp_layers(problem) is not None  # the closed form was used
    ref = _func_hessian(model, X, problem.targets, problem.loss_fn)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)
    # a subset of layers, in a non-network order: the matching sub-blocks
    sub = exact_hessian(model, X, y, loss, params=["5", "1"])
    sl = [problem.selection.slices[k] for k in ("5", "1")]
    expect = torch.cat([torch.cat([H[a, b] for b in sl], 1) for a in sl], 0)
    torch.testing.assert_close(sub, expect, rtol=1e-10, atol=1e-12)


def test_non_mlp_uses_generic_path():
    model = nn.Sequential(nn.Linear(4, 3), nn.Softplus(), nn.Linear(3, 2)).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    problem = CurvatureProblem(model, X, y, "ce")
    assert mlp_layers(problem) is None
    H = _dense_hessian(problem, False)
    ref = _func_hessian_generic(problem)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


def _func_hessian_generic(problem):
    return torch.func.hessian(lambda t: problem.batch_loss(t, problem.X, problem.targets))(
        problem.theta)


@pytest.mark.parametrize("cache", [True, False, None])
def test_cached_graph_hvps_match_dense_hessian(cache):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(17, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (17,))
    op = hessian_operator(model, X, y, "ce", batch_size=6, cache_graph=cache)
    H = exact_hessian(model, X, y, "ce").numpy()
    rng = np.random.default_rng(0)
    for _ in range(3):  # repeated products through the same (cached) graphs
        v = rng.standard_normal(op.shape[0])
        np.testing.assert_allclose(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    V = rng.standard_normal((op.shape[0], 2))
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    expect_cached = cache is not False  # the default caches: this graph is tiny
    assert (len(op.problem._graphs) == 3) == expect_cached
    op.problem.clear_graphs()
    assert not op.problem._graphs
    small = hessian_operator(model, X, y, "ce", graph_memory=0)
    assert not small.problem.cache_graph
