"""PAC-Bayes bounds with diagonal, K-FAC-eigenbasis and exact-eigenbasis Gaussian posteriors.

- :mod:`.pacbayes`: binary kl and kl⁻¹, bound formulas, Gaussian KL, the λ grid, MC bound.
- :mod:`.posteriors`: posteriors Q over a network's layers and the isotropic prior P.
- :mod:`.optimize`: the Dziugaite & Roy objective and its RMSprop optimisation.
- :mod:`.certify`: Monte-Carlo certification, the JSON certificate, :func:`certify_checkpoint`.
"""

from .certify import certify_checkpoint, certify_posterior, recompute_certificate
from .optimize import optimize_posterior
from .pacbayes import (
    all_bounds,
    catoni_bound,
    complexity,
    dr_bound,
    grid_candidates,
    grid_j,
    grid_lambda,
    grid_penalty,
    kl_bernoulli,
    kl_gaussian_isotropic,
    kl_inv,
    lambda_bound,
    maurer_bound,
    mc_error_bound,
    mcallester_bound,
    quadratic_bound,
)
from .posteriors import GaussianPosterior, IsotropicPrior, build_posterior, build_prior

__all__ = [
    "GaussianPosterior", "IsotropicPrior", "all_bounds", "build_posterior", "build_prior",
    "catoni_bound", "certify_checkpoint", "certify_posterior", "complexity", "dr_bound",
    "grid_candidates", "grid_j", "grid_lambda", "grid_penalty", "kl_bernoulli",
    "kl_gaussian_isotropic", "kl_inv", "lambda_bound", "maurer_bound", "mc_error_bound",
    "mcallester_bound", "optimize_posterior", "quadratic_bound", "recompute_certificate",
]
