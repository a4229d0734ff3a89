"""Which layers carry curvature factors, and the coordinates their blocks are written in.

Convention (shared by K-FAC factors, exact layer blocks and posteriors): a Linear or Conv2d layer
with weight W (out × in, a conv kernel reshaped to out × (in_channels·kh·kw)) and bias b is the
matrix W̃ = [W | b] (out × (in + 1)); its parameter vector is vec(W̃) row-major, index
o·(in + 1) + i, where i = in is the bias. Then a Kronecker factorisation G ⊗ Ã with
Ã = E[ã ãᵀ], ã = [a; 1] (homogeneous coordinates) acts on exactly this vector. Without a bias
W̃ = W and the vector is ``W.flatten()``.

Which module types are such layers, and how their parameters map to W̃, is said by their rules
(:class:`~kfacbound.curvature.modules.CurvatureRule`); the functions here look the rule up.
``CURVATURE_LAYERS`` is the tuple of the registered layer types, read from the registry on each
access.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .modules import curvature_rule, is_curvature_layer, types_where


def __getattr__(name: str) -> Any:
    if name == "CURVATURE_LAYERS":
        return types_where(lambda rule: rule.curvature)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def curvature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every Linear/Conv2d layer, in ``named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if is_curvature_layer(m)]


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """W̃ = [W | b] of shape (out, in[+1]) (a view-free copy)."""
    return curvature_rule(module).layer_matrix(module)


def layer_vector(module: nn.Module) -> torch.Tensor:
    """vec(W̃), row-major."""
    return layer_matrix(module).reshape(-1)


def layer_size(module: nn.Module) -> int:
    return curvature_rule(module).layer_size(module)


def set_layer_matrix(module: nn.Module, mat: torch.Tensor) -> None:
    """Write W̃ (out × in[+1]) back into the module's weight and bias."""
    curvature_rule(module).set_layer_matrix(module, mat)


def torch_to_layout_index(module: nn.Module) -> torch.Tensor:
    """Index ``idx`` with ``torch.cat([W.flatten(), b])[idx] == vec(W̃)``.

    Use it to permute a block computed in PyTorch's parameter order (weight then bias) into the
    layout above: ``H_layout = H_torch[idx][:, idx]``.
    """
    return curvature_rule(module).torch_to_layout_index(module)
