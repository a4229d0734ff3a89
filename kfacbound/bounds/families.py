"""The posterior-family registry: one entry per family of Gaussian posteriors Q (issue 14).

A family (:class:`PosteriorFamily`) is everything that differs between posteriors:

- ``curvature`` / :meth:`~PosteriorFamily.needs`: the curvature its layers are built from — none,
  the K-FAC factors (G, A) (:data:`.gather.KFAC_FACTORS`) or the exact layer eigenbases
  (:data:`.gather.EXACT_EIGENBASIS`); the certificate gathers exactly that
  (:mod:`.gather`);
- :meth:`~PosteriorFamily.layer`: the per-layer Gaussian (:class:`.posteriors.LayerPosterior`)
  built from that curvature and the std initialisation (:class:`.posteriors.StdInit`);
- ``refreshes`` / :meth:`~PosteriorFamily.refresh`: whether and how the posterior moves to the
  curvature at its current mean during optimisation (``basis_every``, the "iter" variant of Wu
  et al. 2020);
- ``kron_bases``: its layers live in a Kronecker eigenbasis (attributes ``U_G``, ``U_A``,
  ``eig_G``, ``eig_A``), which the curvature prior (:class:`.kron_prior.KronPrior`) shares.

Registered here: ``diag`` (Dziugaite & Roy 2017, W̃ = M + σ ∘ Z), ``kfac`` (Dissecting
Hessian, Wu et al. 2020: W̃ = M + U_G (S ∘ Z) U_Aᵀ in the eigenbasis of the K-FAC factors, with
the basis refresh) and ``exact`` (the top-k eigenvectors of the exact layer Hessian block plus
one shared variance on their complement). Every family's KL to the isotropic prior N(w0, λI) is
½[tr Σ/λ + ‖M − w0‖²/λ − k + k ln λ − ln det Σ] (:mod:`.posteriors`), whatever the basis.

Adding a family = one subclass decorated with :func:`register_family`; :func:`.build_posterior`,
the certificate (:mod:`.certify`), the optimiser's refresh (:mod:`.optimize`) and the CLI's
``--posterior`` choices and help read from :data:`FAMILIES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from ..curvature.layout import curvature_layers, layer_matrix
from ..errors import KfacboundError, UnsupportedModuleError
from .gather import EXACT_EIGENBASIS, KFAC_FACTORS, CurvatureSource
from .pacbayes import GRID_C
from .posteriors import (
    STD_INITS,
    DiagLayer,
    ExactLayer,
    GaussianPosterior,
    KronEigenLayer,
    LayerPosterior,
    StdInit,
    _ensure_folded,
    _init_log_std,
)


class PosteriorFamily:
    """One family of posteriors; subclass it and register it with :func:`register_family`.

    Class attributes: ``name`` (the value of ``--posterior`` and of the certificate's
    ``posterior``), ``summary`` (its words in the CLI help), ``curvature`` (a
    :class:`.gather.CurvatureSource` or None), ``refreshes`` and ``kron_bases`` (module docstring).
    """

    name: str = ""
    summary: str = ""
    curvature: CurvatureSource | None = None
    refreshes: bool = False
    kron_bases: bool = False

    def needs(self, std_init: str | float) -> CurvatureSource | None:
        """The curvature to gather for this family with std initialisation ``std_init``."""
        return self.curvature

    def layer(self, path: str, module: nn.Module, curvature: Mapping[str, Any] | None,
              init: StdInit) -> LayerPosterior:
        """The Gaussian of the layer ``module`` at ``path`` from the gathered ``curvature``
        ({path: that layer's curvature}, None when the family needs none)."""
        raise NotImplementedError

    def refresh(self, posterior: GaussianPosterior, curvature: Mapping[str, Any]) -> None:
        """Move ``posterior`` to ``curvature`` computed at its current mean (``basis_every``);
        called only when ``refreshes`` is true."""
        raise NotImplementedError(f"the {self.name} posterior has no basis refresh")

    def __repr__(self) -> str:
        return f"<posterior family {self.name!r}>"


#: The registered families by name, in registration order (the order of the CLI choices).
FAMILIES: dict[str, PosteriorFamily] = {}

F = TypeVar("F", bound=type[PosteriorFamily])


def register_family(cls: F) -> F:
    """Class decorator: register (or replace) the family ``cls.name``; returns ``cls``."""
    if not cls.name:
        raise KfacboundError(f"posterior family {cls.__name__} has no name")
    FAMILIES[cls.name] = cls()
    return cls


def posterior_family(family: str | PosteriorFamily) -> PosteriorFamily:
    """The registered family of that name (a family instance is returned as it is)."""
    if isinstance(family, PosteriorFamily):
        return family
    if family not in FAMILIES:
        raise KfacboundError(f"unknown posterior {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_names(**attrs: Any) -> list[str]:
    """Names of the registered families whose attributes equal ``attrs`` (all without)."""
    return [name for name, f in FAMILIES.items()
            if all(getattr(f, key) == value for key, value in attrs.items())]


def family_help() -> str:
    """``name (summary), …`` of every registered family, for the CLI help."""
    return ", ".join(f"{f.name} ({f.summary})" for f in FAMILIES.values())


def layer_curvature(curvature: Mapping[str, Any] | None, path: str, message: str) -> Any:
    """``curvature[path]``, or a :class:`KfacboundError` with ``message`` when it is missing."""
    if curvature is None or path not in curvature:
        raise KfacboundError(message)
    return curvature[path]


# ----------------------------------------------------------------------------- the families


@register_family
class DiagFamily(PosteriorFamily):
    """Dziugaite & Roy (2017): W̃ = M + σ ∘ Z, one std per weight.

    Needs no curvature except for ``std_init='curvature'``: then σ² = 1/(n·h + 1/λ_prior) with
    h = diag(G) ⊗ diag(A) from the K-FAC factors.
    """

    name = "diag"
    summary = "Dziugaite & Roy"

    def needs(self, std_init: str | float) -> CurvatureSource | None:
        return KFAC_FACTORS if std_init == "curvature" else None

    def layer(self, path: str, module: nn.Module, curvature: Mapping[str, Any] | None,
              init: StdInit) -> LayerPosterior:
        mat = layer_matrix(module).detach().to(torch.float64)
        if init.std == "dr":
            log_std = _init_log_std(mat, init.scale, init.std_min, math.sqrt(init.prior_var))
        elif init.std == "curvature":
            G, A = layer_curvature(curvature, path,
                                   f"std_init='curvature' needs K-FAC factors for {path!r}")
            h = torch.outer(torch.diagonal(G).double(), torch.diagonal(A).double())
            log_std = 0.5 * -torch.log(init.n * h.clamp(min=0) + 1.0 / init.prior_var)
        else:
            log_std = torch.full_like(mat, math.log(float(init.std)))
        return DiagLayer(module, torch.exp(log_std), init.dtype)


class EigenbasisFamily(PosteriorFamily):
    """A family whose layer class is built from a pair per layer — the K-FAC factors (G, A) or an
    eigenbasis (U, eigenvalues) — as ``layer_class(module, first, second, std, n, prior_var,
    std_scale, std_min, dtype)``; ``missing`` (with ``{path}``) says what a layer lacks."""

    layer_class: type[LayerPosterior]
    missing: str = ""

    def layer(self, path: str, module: nn.Module, curvature: Mapping[str, Any] | None,
              init: StdInit) -> LayerPosterior:
        first, second = layer_curvature(curvature, path, self.missing.format(path=repr(path)))
        return self.layer_class(module, first, second, init.std, init.n, init.prior_var,
                                init.scale, init.std_min, init.dtype)


@register_family
class KFACEigenbasisFamily(EigenbasisFamily):
    """Wu et al. (2020): W̃ = M + U_G (S ∘ Z) U_Aᵀ in the eigenbasis of the layer's K-FAC factors
    (:class:`.posteriors.KronEigenLayer`); the refresh moves every layer to the eigenbasis of the
    factors at the current mean, keeping tr Σ (the "iter" variant)."""

    name = "kfac"
    summary = "K-FAC eigenbasis"
    curvature = KFAC_FACTORS
    refreshes = True
    kron_bases = True
    layer_class = KronEigenLayer
    missing = "the K-FAC posterior needs factors for layer {path}"

    @torch.no_grad()
    def refresh(self, posterior: GaussianPosterior, curvature: Mapping[str, Any]) -> None:
        for path, layer in posterior.layers():
            if path in curvature:
                G, A = curvature[path]
                layer.update_basis(G.to(layer.U_G.device), A.to(layer.U_A.device))


@register_family
class ExactEigenbasisFamily(EigenbasisFamily):
    """w = μ + U_k (σ_k ∘ z) + σ_⊥ (I − U_k U_kᵀ) z′ with U_k the top-k eigenvectors of the exact
    layer Hessian block (:class:`.posteriors.ExactLayer`)."""

    name = "exact"
    summary = "exact layer blocks"
    curvature = EXACT_EIGENBASIS
    layer_class = ExactLayer
    missing = "the exact posterior needs an eigenbasis for layer {path}"


# ----------------------------------------------------------------------------- building Q


def build_posterior(
    model: nn.Module,
    kind: str | PosteriorFamily = "diag",
    *,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    eigenbases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    curvature: Mapping[str, Any] | None = None,
    std_init: str | float = "dr",
    std_scale: float = 1.0,
    std_min: float = 1e-6,
    n: int = 1,
    prior_var: float = GRID_C,
    dtype: torch.dtype = torch.float32,
) -> GaussianPosterior:
    """Build Q for ``model`` (BatchNorm is folded first; the model itself is not modified).

    ``kind``: a registered posterior family (:mod:`.families`) or its name; the family builds
    each layer's Gaussian from the curvature it declares (``family.needs(std_init)``):
    ``factors``: {path: (G, A)} K-FAC factors in the layout of kfacbound.curvature.layout
    (the kfac family, and the diag family with ``std_init='curvature'``);
    ``eigenbases``: {path: (U, eigenvalues)} of the exact layer blocks (the exact family;
    U has k ≤ P orthonormal columns, see :func:`.posteriors.exact_eigenbasis`);
    ``curvature``: the per-layer curvature of any other source (overrides the two above).
    ``n``: number of bound-set examples (for the curvature-informed std).
    ``prior_var``: λ of the prior; stds are clamped to ≤ √λ at initialisation.
    """
    family = posterior_family(kind)
    if isinstance(std_init, str) and std_init not in STD_INITS:
        raise KfacboundError(f"unknown std init {std_init!r}; choose from {STD_INITS} or a number")
    source = family.needs(std_init)
    if curvature is None and source is not None:
        curvature = {"factors": factors, "eigenbases": eigenbases}.get(source.name)
    init = StdInit(std_init, std_scale, std_min, n, prior_var, dtype)
    model = _ensure_folded(model)
    layers = {path: family.layer(path, module, curvature, init)
              for path, module in curvature_layers(model)}
    if not layers:
        raise UnsupportedModuleError("the model has no Linear/Conv2d layer to put a posterior on")
    return GaussianPosterior(model, layers, family.name)
