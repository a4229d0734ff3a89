"""Gathering the curvature a posterior family is built from (SCIENCE.md §3, §5).

Two sources, each a :class:`CurvatureSource` that a family of :mod:`.families` names:

- :data:`KFAC_FACTORS`: per layer the K-FAC factors (G, A) of the GGN of the mean loss,
  G ⊗ A ≈ the layer block, with A = E[ã ãᵀ] ((in+1) × (in+1), bias row included) and G the
  output-gradient factor — KFLR (exact Λ, Botev et al. 2017) or KFAC (one MC-sampled label,
  Martens & Grosse 2015), ``--curvature kflr|kfac`` (:func:`kfac_factors`);
- :data:`EXACT_EIGENBASIS`: per layer the eigenpairs of the exact Hessian block of the mean loss,
  all of them (dense) or the top k (Lanczos) (:func:`exact_eigenbases`).

"kfac" is thus both a posterior family (the K-FAC eigenbasis posterior) and a K-FAC flavour
(sampled labels); this module only knows the latter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import KfacboundError
from .posteriors import exact_eigenbasis

if TYPE_CHECKING:
    from .config import CertifyConfig

#: K-FAC flavours (``--curvature``): exact output Hessian Λ (KFLR) or one MC-sampled label (KFAC).
CURVATURES = ("kflr", "kfac")


def kfac_factors(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                 method: str = "kflr", progress: bool = False, batch_size: int = 1000,
                 device: str | torch.device = "cpu"
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (G, A)} from the curvature engine (kfacbound.curvature.kfac.compute_kfac)."""
    try:
        from ..curvature.kfac import compute_kfac  # type: ignore[attr-defined]
    except ImportError as exc:  # the engine is not installed yet
        raise KfacboundError(
            "the K-FAC engine (kfacbound.curvature.kfac) is not available"
        ) from exc
    from torch.utils.data import TensorDataset

    result = compute_kfac(model, TensorDataset(X, y), loss, method=method, progress=progress,
                          batch_size=batch_size, device=device)
    items = result.items() if hasattr(result, "items") else result.layers.items()
    out = {}
    for path, layer in items:
        out[path] = (layer.G.detach().cpu(), layer.A.detach().cpu())
    return out


def exact_eigenbases(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                     k: int | None = None, dense_max: int = 6000, lanczos_k: int = 64,
                     progress: bool = False, device: str | torch.device = "cpu"
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (U, eigenvalues)} of the exact Hessian layer blocks of the mean loss (float64).

    Layers with at most ``dense_max`` parameters: dense block from
    kfacbound.curvature.exact.layer_hessian and a full eigh (top ``k`` kept if given). Larger
    layers: the top ``k`` (default ``lanczos_k``) eigenpairs by Lanczos
    (kfacbound.curvature.spectral.top_eigenpairs on the matrix-free Hessian block of
    kfacbound.curvature.layer_ggn.exact_block_operator); the
    posterior then puts one shared variance on the orthogonal complement.
    """
    from ..curvature.exact import layer_hessian
    from ..curvature.layer_ggn import exact_block_operator
    from ..curvature.layout import curvature_layers, layer_size
    from ..curvature.spectral import top_eigenpairs

    out = {}
    for path, module in curvature_layers(model):
        P = layer_size(module)
        if P <= dense_max:
            H = layer_hessian(model, X, y, loss, path, part="H", max_params=dense_max,
                              progress=progress, device=device)
            out[path] = exact_eigenbasis(H.cpu(), k)
        else:
            kk = min(k or lanczos_k, P - 2)
            op = exact_block_operator(model, X, y, loss, path, "H", device=device)
            evals, evecs = top_eigenpairs(op, kk)
            out[path] = (torch.as_tensor(evecs.copy()), torch.as_tensor(evals.copy()))
    return out


Gatherer = Callable[[nn.Module, torch.Tensor, torch.Tensor, str, "CertifyConfig", bool],
                    Mapping[str, Any]]


@dataclass(frozen=True)
class CurvatureSource:
    """A kind of per-layer curvature: {path: curvature} from ``gather(model, X, y, loss, config,
    progress)``.

    ``name`` is also the keyword of :func:`.families.build_posterior` that takes it;
    ``records_flavour``: the certificate's ``curvature`` field records ``config.curvature``
    (the K-FAC flavour) when this source was used.
    """

    name: str
    description: str
    gather: Gatherer
    records_flavour: bool = False

    def __call__(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                 config: CertifyConfig, progress: bool) -> tuple[Mapping[str, Any], float]:
        """(the curvature, seconds it took)."""
        t = time.perf_counter()
        out = self.gather(model, X, y, loss, config, progress)
        return out, time.perf_counter() - t


def _gather_factors(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                    config: CertifyConfig, progress: bool) -> Mapping[str, Any]:
    # looked up at call time, so that tests can stand in for the engine
    return kfac_factors(model, X, y, loss, config.curvature, progress=progress,
                        device=config.device)


def _gather_eigenbases(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                       config: CertifyConfig, progress: bool) -> Mapping[str, Any]:
    return exact_eigenbases(model, X, y, loss, config.exact_k, progress=progress,
                            device=config.device)


KFAC_FACTORS = CurvatureSource("factors", "K-FAC factors {path: (G, A)}", _gather_factors,
                               records_flavour=True)
EXACT_EIGENBASIS = CurvatureSource("eigenbases", "exact layer eigenbases {path: (U, eigenvalues)}",
                                   _gather_eigenbases)
