"""PAC-Bayes bounds with diagonal, K-FAC-eigenbasis and exact-eigenbasis Gaussian posteriors.

- :mod:`.pacbayes`: binary kl and kl⁻¹, bound formulas, Gaussian KL, the λ grid, MC bound.
- :mod:`.posteriors`: posteriors Q over a network's layers (per-layer Gaussians, sampling, KL).
- :mod:`.families`: the posterior-family registry (diag, kfac, exact, and any registered one).
- :mod:`.gather`: the curvature a family is built from (K-FAC factors, exact eigenbases).
- :mod:`.prior`: the isotropic prior P, data-dependent and curvature priors, their provenance.
- :mod:`.kron_prior`: the curvature prior's maths and its KL to a K-FAC posterior.
- :mod:`.optimize`: the Dziugaite & Roy objective and its RMSprop optimisation.
- :mod:`.inputs`: the network, w0 and the data of a certificate (BatchNorm folded).
- :mod:`.config`: :class:`CertifyConfig`, all options of a certificate, and the recipes.
- :mod:`.certificate`: Monte-Carlo certification, the JSON, its recompute, :class:`Certificate`.
- :mod:`.certify`: the pipeline, :func:`.certify.certify` and :func:`certify_checkpoint`
  (``certify`` itself is not re-exported here: it would hide the module of the same name).
- :mod:`.select`: choosing among candidates under a union bound.
"""

from .certificate import (
    Certificate,
    bound_after_trials,
    certify_posterior,
    kl_anatomy,
    recompute_certificate,
)
from .certify import certify_checkpoint
from .config import CertifyConfig
from .families import PosteriorFamily, build_posterior, posterior_family, register_family
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
from .posteriors import GaussianPosterior
from .prior import IsotropicPrior, build_prior

__all__ = [
    "Certificate", "CertifyConfig", "GaussianPosterior", "IsotropicPrior", "PosteriorFamily",
    "all_bounds", "bound_after_trials", "build_posterior", "build_prior", "catoni_bound",
    "certify_checkpoint",
    "certify_posterior", "complexity", "dr_bound", "grid_candidates", "grid_j", "grid_lambda",
    "grid_penalty", "kl_anatomy", "kl_bernoulli",
    "kl_gaussian_isotropic", "kl_inv", "lambda_bound", "maurer_bound", "mc_error_bound",
    "mcallester_bound", "optimize_posterior", "posterior_family", "quadratic_bound",
    "recompute_certificate", "register_family",
]
