"""Independent float64 references for the K-FAC tests (torch.func Jacobians, hand-made patches).

Nothing here uses kfacbound's curvature code: GGN blocks are J_θᵀ Λ J_θ from autograd, with
Λ the autograd Hessian of the per-example loss w.r.t. the logits; K-FAC factors from output
Jacobians ∂f/∂z_t (a perturbation δ added to a layer's output through a forward hook,
differentiated at δ = 0) and input patches cut out by hand.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    """‖a − b‖_F ≤ rtol ‖b‖_F: relative to the whole matrix, since the factors of layers deep
    in a network can be orders of magnitude below those of the last layer (an absolute
    tolerance would make their comparison vacuous); b must not vanish."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    assert float(b.norm()) > 0
    err = float((a.to(b.dtype) - b).norm() / b.norm())
    assert err <= rtol, err


def per_example_loss(loss: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_n whose mean over n is torch's reduction='mean' loss (MSE: ‖f − y‖²/C)."""
    C = f.shape[-1]
    if loss == "ce":
        return -torch.log_softmax(f, -1)[y.long()]
    if loss == "bce":
        return nn.functional.binary_cross_entropy_with_logits(f[0], y.to(f.dtype))
    onehot = nn.functional.one_hot(y.long(), C).to(f.dtype) if C > 1 else y.to(f.dtype)
    return ((f - onehot) ** 2).mean()


def loss_hessian(loss: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return hessian(lambda g: per_example_loss(loss, g, y))(f)


def layer_jacobian(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """J [C, out, in(+1)] of the logits w.r.t. W̃ = [W | b] of layer ``name`` at one input."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    layer = model.get_submodule(name)
    keys = [f"{name}.weight"] + ([f"{name}.bias"] if layer.bias is not None else [])

    def f(*ps):
        p = dict(params)
        p.update(dict(zip(keys, ps, strict=True)))
        return functional_call(model, (p, buffers), (x[None],))[0]

    jac = jacrev(f, argnums=tuple(range(len(keys))))(*[params[k] for k in keys])
    C, out = jac[0].shape[0], jac[0].shape[1]
    Jw = jac[0].reshape(C, out, -1)
    if len(keys) == 2:
        Jw = torch.cat([Jw, jac[1].reshape(C, out, 1)], dim=2)
    return Jw


def ggn_block(model: nn.Module, name: str, X: torch.Tensor, y: torch.Tensor,
              loss: str) -> torch.Tensor:
    """(1/n) Σ_n J_nᵀ Λ_n J_n for layer ``name``, in the layout vec([W | b]) row-major."""
    model = model.eval()
    total = 0
    for x, t in zip(X, y, strict=True):
        J = layer_jacobian(model, name, x)
        J = J.reshape(J.shape[0], -1)
        f = model(x[None])[0].detach()
        total = total + J.T @ loss_hessian(loss, f, t) @ J
    return total / X.shape[0]


def layer_io(model: nn.Module, name: str, x: torch.Tensor):
    """(input, output) of module ``name`` on one example, captured by a plain forward hook."""
    got = {}
    layer = model.get_submodule(name)
    h = layer.register_forward_hook(lambda m, i, o: got.update(a=i[0].detach(), z=o.detach()))
    with torch.no_grad():
        model(x[None])
    h.remove()
    return got["a"], got["z"]


def output_jacobian(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """J[c, o, t] = ∂f_c/∂z_{o,t} at one example: z_{o,t} perturbed by δ through a hook."""
    layer = model.get_submodule(name)
    _, z = layer_io(model, name, x)

    def f(delta):
        h = layer.register_forward_hook(lambda m, i, o: o + delta)
        try:
            return model(x[None])[0]
        finally:
            h.remove()
    J = torch.autograd.functional.jacobian(f, torch.zeros_like(z))  # [C, 1, out, *spatial]
    return J.reshape(J.shape[0], z.shape[1], -1)


def patches(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """ũ_t [T, D(+1)]: the input patch of every output position t, cut out by hand (Linear:
    the input, T = 1; a convolution with any number of spatial dimensions, stride, zero
    padding and dilation: entries (c, k_1, …) in ``weight.reshape(out, -1)`` order)."""
    layer = model.get_submodule(name)
    a, _ = layer_io(model, name, x)
    a = a[0]
    if isinstance(layer, nn.Linear):
        u = a.reshape(1, -1)
    else:
        a = nn.functional.pad(a, [p for p in reversed(layer.padding) for _ in (0, 1)])
        k, s, d = layer.kernel_size, layer.stride, layer.dilation
        sizes = [(L - dd * (kk - 1) - 1) // ss + 1
                 for L, kk, ss, dd in zip(a.shape[1:], k, s, d, strict=True)]
        rows = []
        for pos in itertools.product(*(range(n) for n in sizes)):
            p = a
            for dim, (t, kk, ss, dd) in enumerate(zip(pos, k, s, d, strict=True)):
                p = p.index_select(1 + dim, torch.arange(kk) * dd + t * ss)
            rows.append(p.reshape(-1))
        u = torch.stack(rows)
    if layer.bias is not None:
        u = torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype)], dim=1)
    return u


def kfc_reference(model: nn.Module, name: str, X, y, loss: str):
    """G = (1/n) Σ_i Σ_t J_tᵀ Λ_i J_t and Ã = (1/(nT)) Σ_i Σ_t ũ_t ũ_tᵀ (KFC "expand"; Linear:
    T = 1), from output Jacobians and hand-cut patches; works on any graph."""
    model = model.eval()
    G, A = 0, 0
    for x, t in zip(X, y, strict=True):
        J = output_jacobian(model, name, x)
        with torch.no_grad():
            Lam = loss_hessian(loss, model(x[None])[0], t)
        G = G + torch.einsum("cot,cd,dpt->op", J, Lam, J)
        u = patches(model, name, x)
        A = A + u.T @ u / u.shape[0]
    return G / len(X), A / len(X)
