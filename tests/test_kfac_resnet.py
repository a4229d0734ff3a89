"""Curvature on residual graphs: a tiny zoo ResNet (identity and 1×1-projection shortcuts,
eval-mode BN with non-trivial running statistics) against independent float64 references.

References (none uses kfacbound's curvature code; tests/test_kfac_helpers.py): dense GGN blocks
J_θᵀ Λ J_θ from torch.func Jacobians on the weights; output Jacobians ∂f/∂z_t obtained by adding
a perturbation δ to a layer's output through a forward hook and differentiating at δ = 0; input
patches cut out by hand; dense Hessians from ``torch.autograd.functional.hessian``; curvlinops'
KFACLinearOperator (3.0.1, test-only), which hooks layer inputs and output gradients and so
handles residual networks. Factors on many examples, BN diagonals and curvlinops' type-2 factors
of a smaller ResNet run with the shared reference cases (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfacbound.curvature.exact import exact_ggn, exact_hessian
from kfacbound.curvature.kfac import compute_kfac
from kfacbound.curvature.layout import torch_to_layout_index
from kfacbound.curvature.operators import ggn_operator, hessian_operator
from kfacbound.curvature.spectral import top_eigenpairs
from kfacbound.errors import UnsupportedModuleError
from kfacbound.models import build_model, resolve_spec

from .conftest import randomise_bn
from .test_kfac_helpers import (
    close,
    ggn_block,
    kfc_reference,
    loss_hessian,
    output_jacobian,
    patches,
)

DT = torch.float64
# 8×8 input: layer1 at 8×8 (two blocks, identity shortcuts), layer2 4×4, layer3 2×2 and layer4
# 1×1 (projection shortcuts); every layer of layer4 and fc has a single output position.
SPEC = {"arch": "resnet", "blocks": [2, 1, 1, 1], "channels": [4, 4, 6, 6]}
SINGLE_POSITION = ("layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "fc")


def tiny_resnet(out: int = 3, bn: bool = True, seed: int = 0) -> nn.Module:
    model = build_model(resolve_spec(dict(SPEC, bn=bn), [2, 8, 8], out), seed=seed).to(DT)
    return randomise_bn(model, seed + 100)  # ReLUs alive


def _data(n: int, out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 8, 8, generator=g, dtype=DT),
            torch.randint(0, max(out, 2), (n,), generator=g))


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ------------------------------------------------------------------ KFLR: exactness and factors
def test_reference_reassembles_the_dense_ggn_block():
    """The per-position references are right: Σ_{t,t'} (J_tᵀΛJ_t') ⊗ (ũ_t ũ_t'ᵀ) is the dense GGN
    block of autograd (one example, a conv with 64 positions on the identity-shortcut path)."""
    model = tiny_resnet(bn=False)
    X, y = _data(1)
    for name in ("layer1.0.conv2", "layer3.0.downsample.0"):
        J = output_jacobian(model, name, X[0])
        with torch.no_grad():
            Lam = loss_hessian("ce", model(X[:1])[0], y[0])
        u = patches(model, name, X[0])
        M = torch.einsum("cos,cd,dpt->ospt", J, Lam, J)  # (o, s, p, t)
        full = torch.einsum("ospt,sd,te->odpe", M, u, u)
        o, d = full.shape[0], full.shape[1]
        close(full.reshape(o * d, o * d), ggn_block(model, name, X, y, "ce"))


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("loss,out", [("ce", 3), ("bce", 1)])
def test_kflr_one_example_is_the_exact_ggn_block(bn, loss, out):
    """n = 1: G ⊗ Ã equals the dense GGN block for every layer with one output position (T = 1:
    fc and layer4's convs, residual and projection branch alike); for T > 1 G and Ã equal the
    autograd / hand-cut references of the KFC convention."""
    model = tiny_resnet(out, bn=bn)
    X, y = _data(1, out)
    res = compute_kfac(model, (X, y), loss=loss, method="kflr", progress=False)
    assert list(res) == _layers(model)
    for name in res:
        G, A = kfc_reference(model, name, X, y, loss)
        close(res[name].G, G)
        close(res[name].A, A)
        if name in SINGLE_POSITION:
            dense = ggn_block(model, name, X, y, loss)
            close(torch.kron(res[name].G, res[name].A), dense)


# ------------------------------------------------------------------ curvlinops
def _curvlinops(model, X, y, fisher_type, mc_samples=1):
    from curvlinops import KFACLinearOperator

    data = [(X[i:i + 3], y[i:i + 3]) for i in range(0, len(X), 3)]
    params = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p in m.parameters()]
    op = KFACLinearOperator(model.eval(), nn.CrossEntropyLoss(), params, data,
                            fisher_type=fisher_type, mc_samples=mc_samples,
                            separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    return op._gradient_covariances, op._input_covariances


def test_kfac_mc_on_resnet_agrees_with_curvlinops_mc():
    model = tiny_resnet(seed=6)
    X, y = _data(6, seed=7)
    ours = compute_kfac(model, (X, y), method="kfac", mc_samples=400, batch_size=3,
                        progress=False)
    exact = compute_kfac(model, (X, y), method="kflr", batch_size=3, progress=False)
    G, A = _curvlinops(model, X, y, "mc", mc_samples=400)
    for name in ours:
        ref = exact[name].G
        assert (ours[name].G - ref).norm() / ref.norm() < 0.15, name
        assert (G[name] - ref).norm() / ref.norm() < 0.15, name
        close(ours[name].A, A[name])


# ------------------------------------------------------------------ exact blocks and operators
def _autograd_hessian(model, X, y, names):
    """Dense Hessian of the mean CE loss w.r.t. the parameters ``names`` in torch order."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(theta):
        ps = dict(params)
        for n, s, c in zip(names, shapes, torch.split(theta, sizes), strict=True):
            ps[n] = c.reshape(s)
        return nn.functional.cross_entropy(functional_call(model, (ps, buffers), (X,)), y)
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, theta)


@pytest.mark.parametrize("layer", ["layer2.0.conv1", "layer1.1.conv2", "layer3.0.downsample.0"])
def test_exact_blocks_hvp_and_lanczos_on_resnet_layers(layer):
    model = tiny_resnet(bn=False, seed=8)  # convs with biases: the [W | b] layout
    X, y = _data(4, seed=9)
    module = model.get_submodule(layer)
    idx = torch_to_layout_index(module)
    H_ref = _autograd_hessian(model, X, y, [f"{layer}.weight", f"{layer}.bias"])[idx][:, idx]
    H = exact_hessian(model, X, y, "ce", params=layer)
    close(H, H_ref)
    close(exact_ggn(model, X, y, "ce", params=layer), ggn_block(model, layer, X, y, "ce"))
    op = hessian_operator(model, X, y, "ce", params=layer, batch_size=3)
    V = np.random.default_rng(0).standard_normal((H.shape[0], 5))
    Hn = H_ref.numpy()
    close(torch.as_tensor(op.matmat(V)), torch.as_tensor(Hn @ V))
    close(torch.as_tensor(op.matvec(V[:, 0])), torch.as_tensor(Hn @ V[:, 0]))
    gop = ggn_operator(model, X, y, "ce", params=layer)
    close(torch.as_tensor(gop.matmat(V)),
          torch.as_tensor(ggn_block(model, layer, X, y, "ce").detach().numpy() @ V))
    evals, evecs = top_eigenpairs(op, k=3)
    ref = np.linalg.eigvalsh(Hn)[::-1][:3].copy()
    close(torch.as_tensor(evals), torch.as_tensor(ref), rtol=1e-8)
    residual = np.linalg.norm(Hn @ evecs - evecs * evals, axis=0)
    assert residual.max() <= 1e-7 * abs(ref[0])


def test_exact_hessian_of_nested_bn_parameters():
    model = tiny_resnet(seed=10)
    X, y = _data(3, seed=11)
    name = "layer2.0.downsample.1"
    H = exact_hessian(model, X, y, "ce", params=name)  # γ then β, torch order
    close(H, _autograd_hessian(model, X, y, [f"{name}.weight", f"{name}.bias"]))


# ------------------------------------------------------------------ what is refused
class _InPlaceBlock(nn.Module):
    """A torchvision-style block: ``out += identity`` modifies BN's output in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return out


class _ConvInPlaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu_()


def _head(body: nn.Module) -> nn.Module:
    return nn.Sequential(body, nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).to(DT).eval()


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        s = x.reshape(x.shape[0], 2, 64)[:, :, :8]
        return self.attn(s, s, s)[0].reshape(x.shape[0], -1).repeat(1, 8)


@pytest.mark.parametrize("body,path,kind", [
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.LayerNorm([2, 8, 8])), "0.1", "LayerNorm"),
    (nn.Conv2d(2, 2, 3, padding=1, groups=2), "0", "groups"),
    (_Attention(), "0.attn", "MultiheadAttention"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.GELU()), "0.1", "GELU"),
    (_InPlaceBlock(), "0.bn", "in place"),
    (_ConvInPlaceRelu(), "0.conv", "in place"),
])
def test_unsupported_modules_one_line_error(body, path, kind):
    model = _head(body)
    X, y = _data(2)
    with pytest.raises(UnsupportedModuleError) as err:
        compute_kfac(model, (X, y), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"'{path}'" in msg and kind in msg


def test_backpack_backend_and_kfra_refuse_residual_graphs():
    model = tiny_resnet()
    X, y = _data(2)
    for kw in ({"backend": "backpack"}, {"method": "kfra"}):
        with pytest.raises(UnsupportedModuleError, match="backend='native'"):
            compute_kfac(model, (X, y), progress=False, **kw)
