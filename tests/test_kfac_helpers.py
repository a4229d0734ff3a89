"""Independent float64 references for the K-FAC tests (torch.func Jacobians, hand-made patches).

Nothing here uses kfacbound's curvature code: GGN blocks are J_θᵀ Λ J_θ from autograd, with
Λ the autograd Hessian of the per-example loss w.r.t. the logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


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


def split_at(model: nn.Sequential, name: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(head up to and including child ``name``, the rest) of a flat Sequential."""
    names = list(model._modules)
    k = names.index(name) + 1
    return model[:k], model[k:]


def expand_G_reference(model: nn.Sequential, name: str, X, y, loss: str) -> torch.Tensor:
    """(1/n) Σ_n Σ_t J_tᵀ Λ_n J_t, J_t = ∂ logits / ∂ z[:, t] (KFC-expand G; Linear: T = 1)."""
    head, tail = split_at(model.eval(), name)
    total = 0
    for x, t in zip(X, y, strict=True):
        z = head(x[None]).detach()[0]
        J = jacrev(lambda zz: tail(zz[None])[0])(z)  # [C, out, *spatial]
        C, out = J.shape[0], J.shape[1]
        J = J.reshape(C, out, -1)
        Lam = loss_hessian(loss, tail(z[None])[0].detach(), t)
        total = total + torch.einsum("cot,cd,dpt->op", J, Lam, J)
    return total / X.shape[0]


def expand_A_reference(model: nn.Sequential, name: str, X) -> torch.Tensor:
    """(1/(n T)) Σ_{n,t} ũ ũᵀ from patches cut out by hand (Linear: ã ãᵀ averaged)."""
    names = list(model._modules)
    k = names.index(name)
    layer = model[k]
    a = model[:k].eval()(X).detach()
    if isinstance(layer, nn.Linear):
        u = a.reshape(a.shape[0], 1, -1)
    else:
        ph, pw = layer.padding
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        a = nn.functional.pad(a, (pw, pw, ph, ph))
        H = (a.shape[2] - kh) // sh + 1
        W = (a.shape[3] - kw) // sw + 1
        patches = []
        for i in range(H):
            for j in range(W):
                patch = a[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                patches.append(patch.reshape(a.shape[0], -1))
        u = torch.stack(patches, dim=1)  # [N, T, D]
    if layer.bias is not None:
        u = torch.cat([u, torch.ones(*u.shape[:2], 1, dtype=u.dtype)], dim=2)
    return torch.einsum("ntd,nte->de", u, u) / (u.shape[0] * u.shape[1])
