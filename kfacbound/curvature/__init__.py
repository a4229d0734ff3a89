"""Curvature engine: K-FAC factors through BackPACK, exact Hessian blocks and operators, spectra.

- :mod:`.kfac`: :func:`compute_kfac` — per-layer Kronecker factors (G, Ã) of the GGN of the mean
  loss (KFAC with MC samples, KFLR, KFRA; BatchNorm in eval mode supported), one
  :class:`~.kfac_layer.KronLayer` per Linear/Conv2d layer.
- :mod:`.kfac_backpack`: the BackPACK module extensions we register (BatchNorm1d/2d, Identity,
  KFC-convention Linear/Conv2d).
- :mod:`.exact`: dense float64 Hessian, GGN (H_O) and functional part H_F = H − H_O, per layer
  block or for the whole network.
- :mod:`.operators`: matrix-free Hessian- and GGN-vector products as scipy ``LinearOperator`` s.
- :mod:`.spectral`: Lanczos top-k, Hutchinson trace, stochastic Lanczos quadrature, eigenspace
  overlap.
- :mod:`.layout`: the shared coordinates vec([W | b]) (row-major) of a layer block.
- :mod:`.modules`: one rule per module type (curvature layer, BatchNorm, passive map) that all
  of the above read; :func:`~.modules.register_module_rule` adds a type.
- :mod:`.factors`: the Gram-product accumulators both K-FAC backends share.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .layout import curvature_layers, layer_matrix, layer_vector
from .modules import register_module_rule, rule_for

# Submodules import BackPACK/scipy: load them on first use.
_LAZY = {
    "CURVATURE_LAYERS": ".layout",  # read from the module registry on each access
    "compute_kfac": ".kfac",
    "KFACResult": ".kfac",
    "KronLayer": ".kfac_layer",
    "exact_hessian": ".exact",
    "exact_ggn": ".exact",
    "hessian_parts": ".exact",
    "layer_hessian": ".exact",
    "hessian_operator": ".operators",
    "ggn_operator": ".operators",
    "exact_block_operator": ".layer_ggn",
    "LayerGGN": ".layer_ggn",
    "top_eigenpairs": ".spectral",
    "hutchinson_trace": ".spectral",
    "slq_density": ".spectral",
    "eigenspace_overlap": ".spectral",
    "overlap_curve": ".spectral",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'kfacbound.curvature' has no attribute {name!r}")


__all__ = ["curvature_layers", "layer_matrix", "layer_vector", "register_module_rule",
           "rule_for", *_LAZY]
