"""A curvature-aware prior: per layer, a Gaussian whose precision is Laplace-like in the K-FAC
factors of the *prior split*, and its exact, Kronecker-cheap KL to a K-FAC posterior.

Prior, per layer (W̃ = [W | b], out × in1, row-major vec):

    P = N(W_p, Σ_p),   Σ_p = (Ũ_G ⊗ Ũ_A) diag(1/π) (Ũ_G ⊗ Ũ_A)ᵀ,   π_ij = 1/λ + τ·n_p·g_i·a_j,

with W_p the prior mean (trained on the prior split), G_p = Ũ_G diag(g) Ũ_Gᵀ and
A_p = Ũ_A diag(a) Ũ_Aᵀ the K-FAC factors of the mean loss on the prior split at W_p, n_p its size.
With orthogonal bases this is N(W_p, (λ⁻¹I + τ n_p G_p ⊗ A_p)⁻¹), the Laplace approximation of the
prior split's posterior with a λI base prior, tempered by τ. The bases Ũ are the ones *stored* by
the posterior (rounded to the sampling dtype); P is defined through them, so it is a fixed,
valid prior whatever their rounding: it depends on the prior split only.

Posterior: the K-FAC posterior (:class:`kfacbound.bounds.posteriors.KronEigenLayer`) in the
*same* bases, Σ_q = (Ũ_G ⊗ Ũ_A) diag(s²) (Ũ_G ⊗ Ũ_A)ᵀ, mean M. With V = Ũ_G ⊗ Ũ_A (invertible):

- tr(Σ_p⁻¹ Σ_q) = tr(V⁻ᵀ diag(π) V⁻¹ V diag(s²) Vᵀ) = tr(diag(π s²)) = Σ_ij π_ij s_ij²
  (a similarity transform keeps the trace);
- ln det Σ_p − ln det Σ_q = −Σ ln π − Σ ln s² (the two 2 ln|det V| cancel);
- (M − W_p)ᵀ Σ_p⁻¹ (M − W_p) = Σ_ij π_ij R_ij², R = Ũ_G⁻¹ (M − W_p) Ũ_A⁻ᵀ
  (V⁻¹ vec(D) = vec(Ũ_G⁻¹ D Ũ_A⁻ᵀ) for row-major vec).

Hence, summed over layers with k = Σ out·in1,

    KL(Q‖P) = ½ [ Σ π s² + Σ π R² − k − Σ ln π − Σ ln s² ],

exact in float64 (Ũ⁻¹ computed once in float64), O(out·in1·(out + in1)) per evaluation, never a
Kronecker product. The union bound covers λ on Dziugaite & Roy's grid (penalty 2 ln j + ln(π²/6))
and τ on the finite grid :data:`TAU_GRID` (penalty ln |grid|).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import KfacboundError
from .pacbayes import GRID_B, GRID_C, grid_j

#: Temperatures τ of the curvature term (union bound: ln 9 nats).
TAU_GRID: tuple[float, ...] = tuple(2.0 ** -k for k in range(0, 9))


def tau_penalty() -> float:
    """ln |TAU_GRID|: the union-bound cost of choosing τ from the grid."""
    return math.log(len(TAU_GRID))


class KronPrior(nn.Module):
    """P as in the module docstring, over the K-FAC layers of a posterior; λ, τ trainable.

    ``means``: {path: W_p (out × in1)}; ``bases``: {path: (Ũ_G, Ũ_A, g, a)} with the bases as the
    posterior stores them and g, a the prior-split factor eigenvalues; ``n_prior`` = n_p.
    """

    def __init__(self, means: Mapping[str, torch.Tensor],
                 bases: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]],
                 n_prior: int, lam: float, tau: float = 1.0,
                 c: float = GRID_C, b: float = GRID_B):
        super().__init__()
        if set(means) != set(bases):
            raise KfacboundError("the curvature prior needs a mean and factors for every layer")
        self.paths = list(means)
        self.n_prior = int(n_prior)
        for i, path in enumerate(self.paths):
            UG, UA, g, a = (t.detach().to(torch.float64) for t in bases[path])
            self.register_buffer(f"w0_{i}", means[path].detach().clone())
            self.register_buffer(f"UGinv_{i}", torch.linalg.inv(UG))
            self.register_buffer(f"UAinvT_{i}", torch.linalg.inv(UA).T.contiguous())
            self.register_buffer(f"h_{i}", self.n_prior * torch.outer(g.clamp(min=0),
                                                                      a.clamp(min=0)))
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), dtype=torch.float64))
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau), dtype=torch.float64))
        self.c, self.b = float(c), float(b)

    def center(self, path: str) -> torch.Tensor:
        return getattr(self, f"w0_{self.paths.index(path)}")

    @property
    def lam(self) -> torch.Tensor:
        return torch.exp(self.log_lam)

    @property
    def tau(self) -> torch.Tensor:
        return torch.exp(self.log_tau)

    def j_continuous(self) -> float:
        return grid_j(float(self.lam), self.c, self.b)

    def kl_terms(self, layers, lam=None, tau=None, dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor | int]:
        """Σ π s², Σ π R², Σ ln π, Σ ln s² and k over ``layers`` [(path, KronEigenLayer)]
        (differentiable in the posterior's means and log-stds and in λ, τ)."""
        lam = self.lam if lam is None else lam
        tau = self.tau if tau is None else tau
        out = {"pi_s2": 0.0, "pi_r2": 0.0, "log_pi": 0.0, "log_s2": 0.0}
        k = 0
        for path, layer in layers:
            i = self.paths.index(path)
            ls = layer.log_std_used(dtype=dtype)
            dt = ls.dtype
            h = getattr(self, f"h_{i}").to(dt)
            lam_t = torch.as_tensor(lam, dtype=dt)
            tau_t = torch.as_tensor(tau, dtype=dt)
            pi = 1.0 / lam_t + tau_t * h
            mean = layer.mean.to(dt)
            R = getattr(self, f"UGinv_{i}").to(dt) @ (mean - self.center(path).to(dt)) \
                @ getattr(self, f"UAinvT_{i}").to(dt)
            s2 = torch.exp(2 * ls)
            out["pi_s2"] = out["pi_s2"] + (pi * s2).sum()
            out["pi_r2"] = out["pi_r2"] + (pi * R * R).sum()
            out["log_pi"] = out["log_pi"] + torch.log(pi).sum()
            out["log_s2"] = out["log_s2"] + 2 * ls.sum()
            k += ls.numel()
        out["k"] = k
        return out


def kl_from_terms(t: Mapping[str, float | torch.Tensor]):
    """KL(Q‖P) = ½ [Σ π s² + Σ π R² − k − Σ ln π − Σ ln s²] (module docstring)."""
    return 0.5 * (t["pi_s2"] + t["pi_r2"] - t["k"] - t["log_pi"] - t["log_s2"])


def posterior_kl(posterior, prior, dtype: torch.dtype | None = None) -> torch.Tensor:
    """KL(Q‖P) for either prior: the isotropic one (GaussianPosterior.kl) or a KronPrior."""
    if isinstance(prior, KronPrior):
        return kl_from_terms(prior.kl_terms(posterior.layers(), dtype=dtype))
    return posterior.kl(prior, dtype=dtype)


def prior_penalty(prior) -> float:
    """Union-bound cost of the prior's grids beyond λ's: ln |TAU_GRID| for a KronPrior."""
    return tau_penalty() if isinstance(prior, KronPrior) else 0.0


def tau_candidates(tau: float) -> list[float]:
    """The grid values of τ neighbouring a continuous τ (in log scale)."""
    grid = sorted(TAU_GRID)
    if tau <= grid[0]:
        return [grid[0]]
    if tau >= grid[-1]:
        return [grid[-1]]
    hi = next(i for i, t in enumerate(grid) if t >= tau)
    return [grid[hi - 1], grid[hi]]


@torch.no_grad()
def round_kron_prior(posterior, prior: KronPrior):
    """(j, λ_j, τ_k, KL, terms) over the neighbouring grid points of the learned (λ, τ): the pair
    with the smallest KL + 2 ln j (the τ penalty is the same for every k) wins; float64."""
    from .pacbayes import grid_candidates, grid_lambda, grid_penalty

    best = None
    for j in grid_candidates(float(prior.lam), prior.c, prior.b):
        lam = grid_lambda(j, prior.c, prior.b)
        for tau in tau_candidates(float(prior.tau)):
            t = prior.kl_terms(posterior.layers(), lam=lam, tau=tau, dtype=torch.float64)
            terms = {key: (float(v) if key != "k" else int(v)) for key, v in t.items()}
            kl = float(kl_from_terms(terms))
            score = kl + grid_penalty(j)
            if best is None or score < best[0]:
                best = (score, j, lam, tau, kl, terms)
    assert best is not None
    _, j, lam, tau, kl, terms = best
    return j, lam, tau, kl, dict(terms, prior="kron", tau=tau, n_prior=prior.n_prior)
