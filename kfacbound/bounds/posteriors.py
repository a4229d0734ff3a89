"""Gaussian posteriors Q over a network's weights and KL(Q‖P) to an isotropic prior.

Every posterior is a product over the Linear/Conv2d layers of a model (any module graph of
:mod:`kfacbound.models`: ``nn.Sequential`` networks and the residual ResNets, BatchNorm already
folded; see :class:`LayerSlot` for how the graph is kept) of Gaussians over the layer matrix
W̃ = [W | b] (layout of :mod:`kfacbound.curvature.layout`, out × (in + 1)), each with a trainable
mean M (initialised at the trained weights) and a trainable log-std:

- :class:`DiagLayer` (Dziugaite & Roy 2017): W̃ = M + σ ∘ Z, one std per weight.
- :class:`KronEigenLayer` (Dissecting Hessian, Wu et al. 2020): W̃ = M + U_G (S ∘ Z) U_Aᵀ with
  U_G, U_A the eigenvectors of the layer's K-FAC factors G (out × out) and A = E[ã ãᵀ]
  ((in+1) × (in+1)): Σ = (U_G ⊗ U_A) diag(vec S²) (U_G ⊗ U_A)ᵀ, one variance per Kronecker
  eigen-direction. :meth:`KronEigenLayer.update_basis` moves to a new basis (the "iter" variant).
  (Not to be confused with the curvature block :class:`kfacbound.curvature.kfac_layer.KronLayer`.)
- :class:`ExactLayer`: w = μ + U_k (σ_k ∘ z) + σ_⊥ (I − U_k U_kᵀ) z′ with U_k the top-k (or all)
  eigenvectors of the exact layer Hessian/GGN block; one shared variance σ_⊥² on the orthogonal
  complement when k < P.

Which layer class a posterior family uses, and which curvature it is built from, is declared in
the family registry :mod:`kfacbound.bounds.families`; :func:`build_posterior` reads it.

Z, z, z′ are standard normal. The prior is P = N(w0, λI)
(:class:`kfacbound.bounds.prior.IsotropicPrior`), w0 the (folded) initial weights, λ = exp(log λ)
trainable. Because P is isotropic, KL(Q‖P) = ½[tr Σ/λ + ‖M − w0‖²/λ − k + k ln λ − ln det Σ]
whatever the bases are (:func:`kfacbound.bounds.pacbayes.kl_isotropic_terms`). The certified
tr Σ and ln det Σ are those of the Gaussian that is actually sampled: the Kronecker bases are
stored in float32 for speed and are orthogonal only to rounding, so
:meth:`KronEigenLayer.var_stats` uses their exact float64 column norms and determinants; the
exact-eigenbasis layer keeps and samples its basis in float64.

Sampling. ``forward(x, per_example=True)`` returns the outputs of a network drawn from Q
*independently for every example*:

- Linear layers, local reparameterisation (Kingma et al. 2015): the pre-activation z = W̃ã of one
  example with W̃ ~ Q is Gaussian given ã, so it is drawn directly — diagonal:
  z ~ N(M ã, (σ²)(ã²)); Kronecker: with ã_rot = U_Aᵀ ã, z = M ã + U_G ξ with
  ξ_o ~ N(0, Σ_j S_oj² ã_rot,j²) independent; exact: the weight noise is drawn per example and
  contracted with ã. Independent noise per example and per layer gives exactly the joint law of
  f(x; W), W ~ Q, for every example, independent across examples.
- Conv2d layers share a kernel over positions, so a whole kernel is drawn per example (grouped
  convolution). For speed during *training* ``per_example=False`` draws one kernel per batch for
  conv layers (still an unbiased gradient estimate of the expected loss); certification always
  uses ``per_example=True``.

Std initialisation (``std_init``): ``"dr"`` — the magnitude of the trained weights expressed in
the posterior's basis, |M| (diag), |U_Gᵀ M U_A| (Kronecker), |U_kᵀ μ| (exact), times
``std_scale`` and clamped to [``std_min``, √λ_prior]; ``"curvature"`` — Laplace-like
σ² = 1/(n·h + 1/λ_prior) with h the curvature eigenvalue of that direction (h_ij = g_i a_j for
Kronecker; diag(G) ⊗ diag(A) for the diagonal posterior) of the *mean* loss, so n·h is the
curvature of the summed loss; or a number (the same std everywhere).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.layout import curvature_layers, layer_matrix, set_layer_matrix
from ..curvature.modules import is_curvature_layer, rule_for
from ..errors import KfacboundError, UnsupportedModuleError
from ..models import fold_batchnorm, has_batchnorm
from .pacbayes import GRID_C, kl_isotropic_terms

if TYPE_CHECKING:
    from .prior import IsotropicPrior

STD_INITS = ("dr", "curvature")

_LOG_STD_MIN = -30.0


def _ensure_folded(model: nn.Module) -> nn.Module:
    """Eval-mode copy of ``model`` with BatchNorm folded into the preceding layers."""
    if has_batchnorm(model):
        return fold_batchnorm(model)
    return copy.deepcopy(model).eval()


class LayerPosterior(nn.Module):
    """Gaussian over one layer's W̃ (out × in1); subclasses define the covariance."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not is_curvature_layer(module):
            raise UnsupportedModuleError(f"no posterior for {type(module).__name__}")
        # the layer as a function of W̃, from its module rule (curvature/modules.py)
        self.layer_fn = rule_for(module).function(module)
        self.kind = self.layer_fn.kind
        self.has_bias = module.bias is not None
        self.weight_shape = tuple(module.weight.shape)
        self.mean = nn.Parameter(layer_matrix(module).detach().to(dtype).clone())

    @property
    def out_dim(self) -> int:
        return self.mean.shape[0]

    @property
    def in1(self) -> int:
        return self.mean.shape[1]

    def numel(self) -> int:
        return self.mean.numel()

    # -- subclass interface ------------------------------------------------------------------
    def sample_noise(self, num: int) -> torch.Tensor:
        """``num`` independent draws of W̃ − M, shape (num, out, in1)."""
        raise NotImplementedError

    def linear_noise(self, a1: torch.Tensor) -> torch.Tensor:
        """Per-row independent draws of (W̃ − M) ã for the rows ã of ``a1`` (B × in1)."""
        scale = self.noise_scale(a1)
        if scale is not None:
            return self.noise_from_scale(scale)
        noise = self.sample_noise(a1.shape[0])
        return torch.einsum("boi,bi->bo", noise, a1)

    #: Whether :meth:`noise_inputs` costs enough (a rotation) to be worth caching per example
    #: while the layer's input is fixed (the first layer during optimisation).
    caches_noise_inputs = False

    def noise_inputs(self, a1: torch.Tensor) -> torch.Tensor | None:
        """For layers whose noise scales are s = √(r Vᵀ) with per-row statistics r of ã that do
        not depend on the trained parameters (V = S² does): r (B × in1), else ``None``."""
        return None

    def scale_from_inputs(self, r: torch.Tensor) -> torch.Tensor:
        """s = √(Σ_j S_oj² r_j) per row of r = :meth:`noise_inputs` (differentiable in S)."""
        return torch.sqrt(F.linear(r, torch.exp(2 * self.log_std_used())))

    def noise_scale(self, a1: torch.Tensor) -> torch.Tensor | None:
        """For layers whose (W̃ − M) ã given ã is T (s ∘ ε), ε ~ N(0, I), with a fixed matrix T:
        the per-row scales s (B × out), else ``None``. s depends on ã only, so repeated draws for
        the same inputs (Monte-Carlo passes over a fixed first layer input) reuse it."""
        r = self.noise_inputs(a1)
        return None if r is None else self.scale_from_inputs(r)

    def noise_from_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """One draw of T (s ∘ ε) per row of ``scale`` (see :meth:`noise_scale`)."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------
    def log_std_used(self, name: str = "log_std", dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
        """The log-std parameter ``name`` as the posterior uses it: clamped at the floor
        ``_LOG_STD_MIN``. The KL statistics and every sampler read the stds through here, so the
        sampled Q is always the Q whose KL is certified."""
        return _cast(getattr(self, name), dtype).clamp(min=_LOG_STD_MIN)

    def var_stats(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tr Σ, ln det Σ) of this layer (differentiable), computed in ``dtype`` if given.

        Default: one free std per coordinate of the posterior's basis (diagonal, Kronecker);
        subclasses with a shared complement std override it."""
        ls = self.log_std_used(dtype=dtype)
        return torch.exp(2 * ls).sum(), 2 * ls.sum()

    def forward(self, a: torch.Tensor, sample: bool = True, per_example: bool = True):
        fn = self.layer_fn
        if self.kind == "linear":
            z = fn(a, self.mean)
            if not sample:
                return z
            if a.ndim != 2:
                raise UnsupportedModuleError(
                    f"a sampled linear layer needs (batch, features) inputs, got {tuple(a.shape)}"
                )
            return z + self.linear_noise(fn.rows(a))
        # conv: a kernel shared over positions, drawn per batch or per example
        if not sample:
            return fn(a, self.mean)
        if not per_example:
            return fn(a, self.mean + self.sample_noise(1)[0])
        return fn.per_example(a, self.mean.unsqueeze(0) + self.sample_noise(a.shape[0]))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def _init_log_std(magnitude: torch.Tensor, std_scale: float, std_min: float,
                  std_max: float) -> torch.Tensor:
    std = (magnitude.abs() * std_scale).clamp(min=std_min, max=std_max)
    return torch.log(std)


class DiagLayer(LayerPosterior):
    """W̃ = M + σ ∘ Z (Dziugaite & Roy)."""

    def __init__(self, module: nn.Module, std: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__(module, dtype)
        self.log_std = nn.Parameter(torch.log(std.to(dtype)).reshape(self.mean.shape).clone())

    def sample_noise(self, num: int) -> torch.Tensor:
        std = torch.exp(self.log_std_used())
        return std * torch.randn(num, *std.shape, dtype=std.dtype, device=std.device)

    def noise_inputs(self, a1: torch.Tensor) -> torch.Tensor:
        """r = ã² (then s_o = √(Σ_i σ_oi² ã_i²)); T = I."""
        return a1 * a1

    def noise_from_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale * torch.randn_like(scale)


def _eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix in float64 (eigenvalues clipped at 0)."""
    mat = mat.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return evals.clamp(min=0.0), evecs


class KronEigenLayer(LayerPosterior):
    """W̃ = M + U_G (S ∘ Z) U_Aᵀ, S = exp(log_std) (one std per Kronecker eigen-direction)."""

    def __init__(self, module: nn.Module, G: torch.Tensor, A: torch.Tensor, std: str | float,
                 n: int, prior_var: float, std_scale: float = 1.0, std_min: float = 1e-6,
                 dtype: torch.dtype = torch.float32):
        super().__init__(module, dtype)
        if G.shape != (self.out_dim, self.out_dim) or A.shape != (self.in1, self.in1):
            raise KfacboundError(
                f"K-FAC factors of shapes {tuple(G.shape)}, {tuple(A.shape)} do not fit a layer "
                f"W̃ of shape {tuple(self.mean.shape)} (A must include the bias row/column)"
            )
        eg, ug = _eigh(G)
        ea, ua = _eigh(A)
        self.register_buffer("U_G", ug.to(dtype))
        self.register_buffer("U_A", ua.to(dtype))
        self.register_buffer("eig_G", eg.to(dtype))
        self.register_buffer("eig_A", ea.to(dtype))
        self.register_buffer("norm2_G", torch.zeros(self.out_dim, dtype=torch.float64))
        self.register_buffer("norm2_A", torch.zeros(self.in1, dtype=torch.float64))
        self.register_buffer("logabsdet_U", torch.zeros((), dtype=torch.float64))
        self._basis_stats()
        if std == "dr":
            rot = ug.T @ self.mean.detach().to(torch.float64) @ ua
            log_std = _init_log_std(rot, std_scale, std_min, math.sqrt(prior_var))
        elif std == "curvature":
            h = torch.outer(eg, ea)
            log_std = 0.5 * -torch.log(n * h + 1.0 / prior_var)
        else:
            log_std = torch.full_like(self.mean, math.log(float(std)), dtype=torch.float64)
        self.log_std = nn.Parameter(log_std.to(dtype).clone())

    @torch.no_grad()
    def _basis_stats(self) -> None:
        """Float64 statistics of the bases *as stored* (float32 by default), used by the KL.

        The stored Ũ_G, Ũ_A are the float64 eigenvectors rounded to the sampling dtype, so they
        are orthogonal only up to rounding. The Gaussian actually sampled is
        N(M, Σ̃), Σ̃ = (Ũ_G ⊗ Ũ_A) D (Ũ_G ⊗ Ũ_A)ᵀ, D = diag(vec S²), and its KL terms are exact
        without orthogonality:

        - tr Σ̃ = Σ_ij S_ij² ‖ũ_G,i ⊗ ũ_A,j‖² = Σ_ij S_ij² ‖ũ_G,i‖² ‖ũ_A,j‖²;
        - ln det Σ̃ = Σ_ij ln S_ij² + 2 ln|det(Ũ_G ⊗ Ũ_A)|
          = Σ_ij ln S_ij² + 2 (in1 · ln|det Ũ_G| + out · ln|det Ũ_A|),
          since det(X ⊗ Y) = det(X)^m det(Y)^n for X n×n, Y m×m.

        Stored: the squared column norms ‖ũ_G,i‖², ‖ũ_A,j‖² and ln|det(Ũ_G ⊗ Ũ_A)|, computed in
        float64 from the rounded bases (issue 15: the sampled Q is the Q whose KL is certified).
        """
        UG = self.U_G.detach().to(torch.float64)
        UA = self.U_A.detach().to(torch.float64)
        self.norm2_G.copy_((UG * UG).sum(0))
        self.norm2_A.copy_((UA * UA).sum(0))
        ld = self.in1 * torch.linalg.slogdet(UG)[1] + self.out_dim * torch.linalg.slogdet(UA)[1]
        self.logabsdet_U.copy_(ld)

    def var_stats(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tr Σ̃, ln det Σ̃) of the sampled Gaussian, exact for the stored bases (see
        :meth:`_basis_stats`); differentiable in the log-stds."""
        ls = self.log_std_used(dtype=dtype)
        nG = self.norm2_G.to(ls.dtype)
        nA = self.norm2_A.to(ls.dtype)
        trace = (nG[:, None] * torch.exp(2 * ls) * nA[None, :]).sum()
        return trace, 2 * ls.sum() + 2 * self.logabsdet_U.to(ls.dtype)

    def sample_noise(self, num: int) -> torch.Tensor:
        S = torch.exp(self.log_std_used())
        Z = torch.randn(num, *S.shape, dtype=S.dtype, device=S.device)
        return self.U_G @ (S * Z) @ self.U_A.T

    caches_noise_inputs = True

    def noise_inputs(self, a1: torch.Tensor) -> torch.Tensor:
        """r = ã_rot² with ã_rot = U_Aᵀ ã (then s_o = √(Σ_j S_oj² ã_rot,j²)); T = U_G."""
        a_rot = a1 @ self.U_A  # rows: U_Aᵀ ã
        return a_rot * a_rot

    def noise_from_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return (scale * torch.randn_like(scale)) @ self.U_G.T

    @torch.no_grad()
    def update_basis(self, G: torch.Tensor, A: torch.Tensor) -> None:
        """Move to the eigenbasis of new factors (the "iter" variant).

        The new variances are the diagonal of the current covariance in the new basis:
        S′² = R_G S² R_Aᵀ with R = (U′ᵀU)∘(U′ᵀU). R is doubly stochastic, so tr Σ is kept and
        ln det can only grow (Jensen): the KL does not increase at the switch.
        """
        eg, ug = _eigh(G)
        ea, ua = _eigh(A)
        ug, ua = ug.to(self.U_G.dtype), ua.to(self.U_A.dtype)
        RG = (ug.T @ self.U_G) ** 2
        RA = (ua.T @ self.U_A) ** 2
        S2 = torch.exp(2 * self.log_std_used())
        S2new = (RG @ S2 @ RA.T).clamp(min=math.exp(2 * _LOG_STD_MIN))
        self.log_std.copy_(0.5 * torch.log(S2new))
        self.U_G.copy_(ug)
        self.U_A.copy_(ua)
        self.eig_G.copy_(eg.to(self.eig_G.dtype))
        self.eig_A.copy_(ea.to(self.eig_A.dtype))
        self._basis_stats()


class ExactLayer(LayerPosterior):
    """w = μ + U_k(σ_k ∘ z) + σ_⊥(I − U_kU_kᵀ)z′ in the layout vec(W̃) (row-major)."""

    def __init__(self, module: nn.Module, U: torch.Tensor, evals: torch.Tensor, std: str | float,
                 n: int, prior_var: float, std_scale: float = 1.0, std_min: float = 1e-6,
                 dtype: torch.dtype = torch.float32):
        super().__init__(module, dtype)
        P = self.numel()
        if U.ndim != 2 or U.shape[0] != P or U.shape[1] > P or evals.shape != (U.shape[1],):
            raise KfacboundError(
                f"exact eigenbasis of shape {tuple(U.shape)} does not fit a layer with {P} "
                "parameters"
            )
        U64 = U.detach().to(torch.float64)
        k = U64.shape[1]
        self.k = k
        # float64 basis, sampled in float64: the complement projector I − U Uᵀ is then exact to
        # ~1e-15, so the sampled covariance is the one whose KL is certified (issue 15).
        self.register_buffer("U", U64)
        self.register_buffer("evals", evals.detach().to(dtype))
        mu = self.mean.detach().reshape(-1).to(torch.float64)
        coef = U64.T @ mu
        if std == "dr":
            log_std = _init_log_std(coef, std_scale, std_min, math.sqrt(prior_var))
            resid = mu - U64 @ coef
            perp = (resid.norm() / math.sqrt(max(P - k, 1))).reshape(1)
            log_perp = _init_log_std(perp, std_scale, std_min, math.sqrt(prior_var))
        elif std == "curvature":
            h = evals.detach().to(torch.float64).clamp(min=0.0)
            log_std = 0.5 * -torch.log(n * h + 1.0 / prior_var)
            # the complement holds the smallest curvature: treat it as flat (prior-sized std).
            log_perp = torch.full((1,), 0.5 * math.log(prior_var), dtype=torch.float64)
        else:
            log_std = torch.full((k,), math.log(float(std)), dtype=torch.float64)
            log_perp = torch.full((1,), math.log(float(std)), dtype=torch.float64)
        self.log_std = nn.Parameter(log_std.to(dtype).clone())
        self.log_std_perp = nn.Parameter(log_perp.to(dtype).clone())

    def var_stats(self, dtype=None):
        ls = self.log_std_used(dtype=dtype)
        rest = self.numel() - self.k
        sum_var = torch.exp(2 * ls).sum()
        sum_log = 2 * ls.sum()
        if rest > 0:
            lp = self.log_std_used("log_std_perp", dtype)[0]
            sum_var = sum_var + rest * torch.exp(2 * lp)
            sum_log = sum_log + rest * 2 * lp
        return sum_var, sum_log

    def sample_noise(self, num: int) -> torch.Tensor:
        std = torch.exp(self.log_std_used(dtype=self.U.dtype))
        z = torch.randn(num, self.k, dtype=std.dtype, device=std.device)
        noise = (z * std) @ self.U.T
        if self.numel() > self.k:
            zp = torch.randn(num, self.numel(), dtype=std.dtype, device=std.device)
            zp = zp - (zp @ self.U) @ self.U.T
            noise = noise + torch.exp(self.log_std_used("log_std_perp", self.U.dtype)) * zp
        return noise.reshape(num, self.out_dim, self.in1).to(self.mean.dtype)


def exact_eigenbasis(H: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, eigenvalues) of a dense symmetric layer block: all (k=None) or the top-k."""
    evals, evecs = _eigh(H)
    order = torch.argsort(evals, descending=True)
    if k is not None:
        order = order[:k]
    return evecs[:, order], evals[order]


class LayerSlot(nn.Module):
    """Stands in for one Linear/Conv2d layer inside the posterior's copy of the network.

    :class:`GaussianPosterior` deep-copies the (BatchNorm-folded, eval-mode) model and puts a slot
    at the module path of every Linear/Conv2d layer. The copied model's own ``forward`` still runs
    (``module(x)``), so residual sums, poolings, flattening and any other parameter-free graph
    work exactly as in the model; only the layers change: a slot passes its input to its
    :class:`LayerPosterior` with the flags ``sample`` / ``per_example`` that
    :meth:`GaussianPosterior.forward` sets on all slots before the call.

    Why the law is unchanged: each layer is evaluated once per forward pass (checked through
    ``calls``), with weight noise drawn independently per layer and, with ``per_example=True``,
    independently per example (local reparameterisation for Linear, one kernel per example by
    grouped convolution for Conv2d). Given the layer inputs, which depend only on the example's
    own draws in the earlier layers, the outputs are therefore those of f(x; W) with W ~ Q drawn
    for each example, independent across examples — the same argument as for a chain, since the
    graph only routes and combines the outputs of the layers deterministically.
    """

    def __init__(self, layer: LayerPosterior):
        super().__init__()
        self.layer = layer
        self.sample = True
        self.per_example = True
        self.calls = 0

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layer(a, sample=self.sample, per_example=self.per_example)


class GaussianPosterior(nn.Module):
    """Q over any module graph: a Gaussian :class:`LayerPosterior` for every Linear/Conv2d layer.

    ``net`` is a copy of the model in which each layer at dotted path p is replaced by a
    :class:`LayerSlot` around its posterior (see there); :meth:`layers` lists
    (p, LayerPosterior) in :func:`~kfacbound.curvature.layout.curvature_layers` order. Every other
    module must be free of parameters (BatchNorm is folded before).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, LayerPosterior], kind: str):
        super().__init__()
        self.kind = kind
        model = copy.deepcopy(model).eval()
        found = curvature_layers(model)
        self.layer_paths: list[str] = [path for path, _ in found]
        all_paths = [p for p, m in model.named_modules(remove_duplicate=False)
                     if is_curvature_layer(m)]
        if len(all_paths) != len(self.layer_paths):
            shared = sorted(set(all_paths) - set(self.layer_paths))
            raise UnsupportedModuleError(
                f"layer {shared[0]!r} shares its module with another path; weight sharing is "
                "not supported by the posteriors"
            )
        for path, module in model.named_modules():
            if is_curvature_layer(module):
                if path not in layers:
                    raise UnsupportedModuleError(f"layer {path!r} has no posterior")
                continue
            if any(True for _ in module.parameters(recurse=False)):
                raise UnsupportedModuleError(
                    f"module {path!r} ({type(module).__name__}) has parameters but no posterior; "
                    "only Linear/Conv2d layers (and BatchNorm, folded) are supported"
                )
        template = copy.deepcopy(model).eval()
        self.names = list(model._modules)
        slots = {path: LayerSlot(layers[path]) for path in self.layer_paths}
        if "" in slots:  # the model is a single layer
            model = slots[""]
        else:
            for path, slot in slots.items():
                prefix, _, leaf = path.rpartition(".")
                parent = model.get_submodule(prefix) if prefix else model
                parent._modules[leaf] = slot
        self.net = model
        self._template = template  # registered after ``net``: parameter order as before

    def _slots(self) -> list[LayerSlot]:
        return [self.net.get_submodule(p) if p else self.net for p in self.layer_paths]

    def layers(self) -> list[tuple[str, LayerPosterior]]:
        return [(p, s.layer) for p, s in zip(self.layer_paths, self._slots(), strict=True)]

    @property
    def blocks(self) -> dict[str, nn.Module]:
        """The top-level children of the model by name, each layer as its
        :class:`LayerPosterior` (for a flat ``nn.Sequential``: the network's stages in order)."""
        if isinstance(self.net, LayerSlot):
            return {}
        return {name: child.layer if isinstance(child, LayerSlot) else child
                for name, child in self.net._modules.items()}

    def _run(self, x: torch.Tensor, fn, sample: bool, per_example: bool) -> torch.Tensor:
        slots = self._slots()
        for slot in slots:
            slot.sample, slot.per_example, slot.calls = sample, per_example, 0
        out = fn(x)
        for path, slot in zip(self.layer_paths, slots, strict=True):
            if slot.calls > 1 and sample:
                raise UnsupportedModuleError(
                    f"layer {path!r} was applied {slot.calls} times in one forward pass; a "
                    "sampled network would draw its weights once per call, not once per network"
                )
        return out

    def forward(self, x: torch.Tensor, sample: bool = True, per_example: bool = True):
        """Outputs of the network under Q: the means (``sample=False``), one network from Q per
        example (``per_example=True``), or one per batch for conv layers (training only)."""
        return self._run(x, self.net, sample, per_example)

    def _shortcut_layer(self) -> int | None:
        """Index of the first parameterised child of a ``nn.Sequential`` net when it is a linear
        layer whose noise has per-row scales (:meth:`LayerPosterior.noise_scale`), else None."""
        if not isinstance(self.net, nn.Sequential):
            return None
        for i, child in enumerate(self.net._modules.values()):
            if any(True for _ in child.parameters()):
                if isinstance(child, LayerSlot) and child.layer.kind == "linear":
                    return i
                return None
        return None

    def _first_layer_input(self, x: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of the shortcut layer ``first``, its rows ã with the bias column)."""
        for child in list(self.net._modules.values())[:first]:
            x = child(x)
        layer = self.net[first].layer
        return x, torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if layer.has_bias else x

    def _rest(self, first: int, h: torch.Tensor) -> torch.Tensor:
        for child in list(self.net._modules.values())[first + 1:]:
            h = child(h)
        return h

    @torch.no_grad()
    def first_noise_inputs(self, X: torch.Tensor, chunk: int = 4096,
                           max_bytes: int = 1 << 30) -> torch.Tensor | None:
        """The first layer's per-example noise statistics r = :meth:`LayerPosterior.noise_inputs`
        of its input for every row of X (n × in1, on X's device), for :meth:`forward_cached`;
        None when there is no linear first layer with noise statistics worth caching
        (``caches_noise_inputs``: the Kronecker rotation U_Aᵀã) or they would exceed
        ``max_bytes``. Valid while the layer's basis does not change."""
        first = self._shortcut_layer()
        if first is None or not self.net[first].layer.caches_noise_inputs:
            return None
        layer = self.net[first].layer
        if len(X) * layer.in1 * layer.mean.element_size() > max_bytes:
            return None
        device = layer.mean.device
        rows = [layer.noise_inputs(self._first_layer_input(X[i:i + chunk].to(device), first)[1])
                .to(X.device) for i in range(0, len(X), chunk)]
        return torch.cat(rows)

    def forward_cached(self, x: torch.Tensor, noise_inputs: torch.Tensor,
                       per_example: bool = True) -> torch.Tensor:
        """``forward(x, per_example=per_example)`` with the first layer's noise statistics given
        (the rows of :meth:`first_noise_inputs` for x): the same law, and the same draws in the
        same order, without recomputing U_Aᵀã; later layers sample as usual."""
        first = self._shortcut_layer()
        if first is None:
            raise KfacboundError("forward_cached needs a linear first layer (see "
                                 "first_noise_inputs)")
        layer = self.net[first].layer
        h, _ = self._first_layer_input(x, first)
        h = layer(h, sample=False) + layer.noise_from_scale(layer.scale_from_inputs(noise_inputs))
        return self._run(h, lambda z: self._rest(first, z), True, per_example)

    @torch.no_grad()
    def forward_repeated(self, x: torch.Tensor, passes: int) -> torch.Tensor:
        """Outputs of ``passes`` independent networks from Q for every example: (passes, B, …).

        Same law as ``passes`` calls of ``forward(x, per_example=True)``: every (pass, example)
        pair gets its own independent draw. The input is repeated ``passes`` times along the batch
        dimension and the sampled network runs once on it. Shortcut for an ``nn.Sequential`` whose
        first parameterised child is a linear layer with per-row noise scales (diagonal,
        Kronecker): its input is the same in every pass, so its mean pre-activation M ã and its
        noise scales (:meth:`LayerPosterior.noise_scale`) are computed once and only the noise
        T (s ∘ ε) is drawn per pass; the later children run on the passes stacked into the batch.
        """
        B = x.shape[0]
        first = self._shortcut_layer()
        if first is not None:
            children = list(self.net._modules.values())
            x, a1 = self._first_layer_input(x, first)
            layer = children[first].layer
            scale = layer.noise_scale(a1)
            if scale is not None:
                z = layer(x, sample=False)
                reps = scale.unsqueeze(0).expand(passes, *scale.shape).reshape(passes * B, -1)
                h = z.repeat(passes, 1) + layer.noise_from_scale(reps)
                out = self._run(h, lambda z: self._rest(first, z), True, True)
                return out.reshape(passes, B, *out.shape[1:])
            net: nn.Module = nn.Sequential(*children[first:])  # exact layer: repeat its input
        else:
            net = self.net
        x = x.unsqueeze(0).expand(passes, *x.shape).reshape(passes * B, *x.shape[1:])
        out = self._run(x, net, True, True)
        return out.reshape(passes, B, *out.shape[1:])

    def numel(self) -> int:
        return sum(layer.numel() for _, layer in self.layers())

    def kl_terms(self, prior: IsotropicPrior, dtype: torch.dtype | None = None):
        """(‖M − w0‖², tr Σ, ln det Σ, k) summed over layers (differentiable)."""
        sq = sv = sl = 0.0
        for path, layer in self.layers():
            mean = layer.mean if dtype is None else layer.mean.to(dtype)
            w0 = prior.center(path)
            diff = mean if w0 is None else mean - w0.to(mean.dtype)
            v, lv = layer.var_stats(dtype)
            sq = sq + (diff * diff).sum()
            sv = sv + v
            sl = sl + lv
        return sq, sv, sl, self.numel()

    def kl(self, prior: IsotropicPrior, lam: torch.Tensor | float | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
        """KL(Q‖N(w0, λI)) in nats; ``lam`` defaults to the prior's current (learned) λ."""
        sq, sv, sl, k = self.kl_terms(prior, dtype)
        if lam is None:
            lam = prior.lam if dtype is None else prior.lam.to(dtype)
        return kl_isotropic_terms(sq, sv, sl, k, lam)

    def mean_model(self) -> nn.Module:
        """A copy of the deterministic (folded) network with weights set to the posterior means,
        written at each layer's dotted path."""
        model = copy.deepcopy(self._template)
        for path, layer in self.layers():
            mod = model.get_submodule(path) if path else model
            set_layer_matrix(mod, layer.mean.detach().to(mod.weight.dtype))
        return model


@dataclass(frozen=True)
class StdInit:
    """How a posterior family initialises its stds (module docstring, "Std initialisation").

    ``std``: ``"dr"`` (|M| in the family's basis × ``scale``, clamped to [``std_min``,
    √``prior_var``]), ``"curvature"`` (σ² = 1/(n·h + 1/λ_prior), h the curvature eigenvalue of
    the direction) or a number; ``n``: bound-set size; ``prior_var``: λ of the prior.
    """

    std: str | float = "dr"
    scale: float = 1.0
    std_min: float = 1e-6
    n: int = 1
    prior_var: float = GRID_C
    dtype: torch.dtype = torch.float32
