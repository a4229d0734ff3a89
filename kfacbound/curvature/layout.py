"""Which layers carry curvature factors, and the coordinates their blocks are written in.

Convention (shared by K-FAC factors, exact layer blocks and posteriors): a Linear or Conv2d layer
with weight W (out × in, a conv kernel reshaped to out × (in_channels·kh·kw)) and bias b is the
matrix W̃ = [W | b] (out × (in + 1)); its parameter vector is vec(W̃) row-major, index
o·(in + 1) + i, where i = in is the bias. Then a Kronecker factorisation G ⊗ Ã with
Ã = E[ã ãᵀ], ã = [a; 1] (homogeneous coordinates) acts on exactly this vector. Without a bias
W̃ = W and the vector is ``W.flatten()``.
"""

from __future__ import annotations

import torch
from torch import nn

CURVATURE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def curvature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every Linear/Conv2d layer, in ``named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CURVATURE_LAYERS)]


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """W̃ = [W | b] of shape (out, in[+1]) (a view-free copy)."""
    w = module.weight.reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return w.clone()
    return torch.cat([w, module.bias.reshape(-1, 1)], dim=1)


def layer_vector(module: nn.Module) -> torch.Tensor:
    """vec(W̃), row-major."""
    return layer_matrix(module).reshape(-1)


def layer_size(module: nn.Module) -> int:
    return sum(p.numel() for p in (module.weight, module.bias) if p is not None)


def set_layer_matrix(module: nn.Module, mat: torch.Tensor) -> None:
    """Write W̃ (out × in[+1]) back into the module's weight and bias."""
    with torch.no_grad():
        out = module.weight.shape[0]
        mat = mat.reshape(out, -1)
        n_w = module.weight[0].numel()
        module.weight.copy_(mat[:, :n_w].reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(mat[:, n_w])


def torch_to_layout_index(module: nn.Module) -> torch.Tensor:
    """Index ``idx`` with ``torch.cat([W.flatten(), b])[idx] == vec(W̃)``.

    Use it to permute a block computed in PyTorch's parameter order (weight then bias) into the
    layout above: ``H_layout = H_torch[idx][:, idx]``.
    """
    out = module.weight.shape[0]
    n_w = module.weight[0].numel()
    w_idx = torch.arange(out * n_w).reshape(out, n_w)
    if module.bias is None:
        return w_idx.reshape(-1)
    b_idx = out * n_w + torch.arange(out).reshape(out, 1)
    return torch.cat([w_idx, b_idx], dim=1).reshape(-1)
