"""PAC-Bayes bound arithmetic: binary kl, its inverse, the bound formulas, Gaussian KL, λ grid.

Setting (SCIENCE.md §5): a stochastic predictor Q over weights, a prior P fixed before the bound
set S (n examples, 0-1 loss in [0, 1]) is seen, confidence 1 − δ. All scalar maths is float64
(Python floats); the Gaussian KL is a differentiable torch function (use float64 tensors where
the value is certified).

Formulas (L̂ = empirical 0-1 risk of Q on S, L = its true risk, KL = KL(Q‖P)):

- Maurer / Langford–Seeger (Maurer 2004): kl(L̂ ‖ L) ≤ (KL + ln(2√n/δ)) / n.
- Dziugaite & Roy (2017), their eq. for B_RE: kl(L̂ ‖ L) ≤ (KL + ln(n/δ)) / (n − 1).
- McAllester / Pinsker: L ≤ L̂ + √(B/2) for either B above.
- Quadratic ("f-quad", Pérez-Ortiz et al. 2021): L ≤ (√(L̂ + ε) + √ε)²,
  ε = (KL + ln(2√n/δ)) / (2n).
- λ-bound (Thiemann et al. 2017): L ≤ L̂/(1 − λ/2) + (KL + ln(2√n/δ))/(nλ(1 − λ/2)), which holds
  for all λ ∈ (0, 2) simultaneously (it relaxes the Maurer bound), so λ may be optimised.
- Catoni (2007, Thm 1.2.6): for a fixed C > 0,
  L ≤ (1 − exp(−C L̂ − (KL + ln(1/δ))/n)) / (1 − exp(−C)); here C ranges over a finite grid
  with a union bound (δ/|grid| each).

Union bound over the prior variance (Dziugaite & Roy): λ_j = c·exp(−j/b), j = 1, 2, …, with
prior weight 6/(π² j²), i.e. the penalty 2 ln j + ln(π²/6) is added to KL in every numerator.

Monte-Carlo sample convergence (Langford & Caruana 2002): if ê_N is the mean of N independent
0/1 draws whose mean is L̂(Q), then with probability 1 − δ′, L̂(Q) ≤ kl⁻¹(ê_N, ln(1/δ′)/N).
"""

from __future__ import annotations

import math

import torch

from ..errors import KfacboundError

#: Dziugaite & Roy's prior-variance grid constants: λ_j = c·exp(−j/b).
GRID_C = 0.1
GRID_B = 100.0

FORMULAS = ("maurer", "dr")


# ----------------------------------------------------------------------------- binary kl


def kl_bernoulli(q: float, p: float) -> float:
    """kl(q‖p) = q ln(q/p) + (1 − q) ln((1 − q)/(1 − p)) in nats, with 0 ln 0 = 0.

    Returns +inf when p ∈ {0, 1} and q ≠ p.
    """
    q, p = float(q), float(p)
    if not (0.0 <= q <= 1.0 and 0.0 <= p <= 1.0):
        raise KfacboundError(f"kl(q‖p) needs q, p in [0, 1]; got q={q}, p={p}")
    # Near p = q (small c in kl⁻¹) the log1p forms q ln(q/p) = −q ln(1 + (p − q)/q) and
    # (1 − q) ln((1 − q)/(1 − p)) = (1 − q) ln(1 + (p − q)/(1 − p)) keep the precision that the
    # ratios lose; far from it the plain ratios are exact enough and cannot overflow.
    d = p - q
    out = 0.0
    if q > 0.0:
        if p == 0.0:
            return math.inf
        out += -q * math.log1p(d / q) if abs(d) < 0.5 * q else q * math.log(q / p)
    if q < 1.0:
        if p == 1.0:
            return math.inf
        r = 1.0 - p
        out += (1.0 - q) * (math.log1p(d / r) if abs(d) < 0.5 * r else math.log((1.0 - q) / r))
    return max(out, 0.0)


def kl_inv(q: float, c: float, tol: float = 1e-12) -> float:
    """kl⁻¹(q, c) = max{p ∈ [q, 1] : kl(q‖p) ≤ c}, by bisection in float64.

    Returns the *upper* end of the final bracket (width ≤ ``tol``), so the result is never below
    the true inverse: a valid upper bound on the risk. Edge cases: c = 0 → q; c = ∞ or q = 1 → 1.
    """
    q, c = float(q), float(c)
    if math.isnan(q) or math.isnan(c):
        raise KfacboundError("kl_inv got NaN")
    if not 0.0 <= q <= 1.0:
        raise KfacboundError(f"kl_inv needs q in [0, 1], got {q}")
    if c < 0.0:
        raise KfacboundError(f"kl_inv needs c ≥ 0, got {c}")
    if q >= 1.0 or math.isinf(c):
        return 1.0
    if c == 0.0:
        return q
    # kl(q‖1) = ∞ > c, so the answer lies in [q, 1); kl(q‖·) is increasing on [q, 1].
    lo, hi = q, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # float64 resolution reached
            break
        if kl_bernoulli(q, mid) > c:
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- λ grid


def grid_lambda(j: float, c: float = GRID_C, b: float = GRID_B) -> float:
    """Prior variance λ_j = c·exp(−j/b)."""
    return float(c) * math.exp(-float(j) / float(b))


def grid_j(lam: float, c: float = GRID_C, b: float = GRID_B) -> float:
    """Continuous grid index j = b·ln(c/λ) of a prior variance λ (inverse of grid_lambda)."""
    return float(b) * math.log(float(c) / float(lam))


def grid_penalty(j: float) -> float:
    """2 ln j + ln(π²/6): the union-bound cost of grid point j ≥ 1 (weight 6/(π² j²))."""
    if j < 1:
        raise KfacboundError(f"grid index j must be ≥ 1 (got {j}); j ≤ 0 has no prior weight")
    return 2.0 * math.log(j) + math.log(math.pi**2 / 6.0)


def grid_candidates(lam: float, c: float = GRID_C, b: float = GRID_B) -> list[int]:
    """The integer grid indices j ≥ 1 neighbouring a continuous λ (floor and ceil of b ln(c/λ))."""
    jc = grid_j(lam, c, b)
    lo = max(1, math.floor(jc))
    hi = max(1, math.ceil(jc))
    return sorted({lo, hi})


# ----------------------------------------------------------------------------- complexity terms


def complexity(
    kl: float, n: int, delta: float, formula: str = "maurer", penalty: float = 0.0
) -> float:
    """The right-hand side B of kl(L̂‖L) ≤ B.

    ``maurer``: (KL + penalty + ln(2√n/δ)) / n;  ``dr``: (KL + penalty + ln(n/δ)) / (n − 1).
    """
    _check(n, delta)
    if formula == "maurer":
        return (kl + penalty + math.log(2.0 * math.sqrt(n) / delta)) / n
    if formula == "dr":
        return (kl + penalty + math.log(n / delta)) / (n - 1)
    raise KfacboundError(f"unknown bound formula {formula!r}; choose from {', '.join(FORMULAS)}")


def _check(n: int, delta: float) -> None:
    if n < 2:
        raise KfacboundError(f"a PAC-Bayes bound needs n ≥ 2 examples, got {n}")
    if not 0.0 < delta < 1.0:
        raise KfacboundError(f"delta must be in (0, 1), got {delta}")


def kl_bound(emp: float, kl: float, n: int, delta: float, formula: str = "maurer",
             penalty: float = 0.0) -> float:
    """kl⁻¹(L̂, B) with B from :func:`complexity` (Maurer or Dziugaite–Roy form)."""
    return kl_inv(emp, complexity(kl, n, delta, formula, penalty))


def maurer_bound(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0) -> float:
    """kl⁻¹(L̂, (KL + ln(2√n/δ))/n)."""
    return kl_bound(emp, kl, n, delta, "maurer", penalty)


def dr_bound(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0) -> float:
    """Dziugaite & Roy's form kl⁻¹(L̂, (KL + ln(n/δ))/(n − 1))."""
    return kl_bound(emp, kl, n, delta, "dr", penalty)


def mcallester_bound(emp: float, kl: float, n: int, delta: float, formula: str = "maurer",
                     penalty: float = 0.0) -> float:
    """Pinsker relaxation L̂ + √(B/2), clipped to 1."""
    return min(1.0, emp + math.sqrt(complexity(kl, n, delta, formula, penalty) / 2.0))


def quadratic_bound(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0) -> float:
    """(√(L̂ + ε) + √ε)², ε = (KL + penalty + ln(2√n/δ))/(2n), clipped to 1."""
    eps = complexity(kl, n, delta, "maurer", penalty) / 2.0
    return min(1.0, (math.sqrt(emp + eps) + math.sqrt(eps)) ** 2)


def lambda_bound(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0,
                 lam: float | None = None) -> float:
    """L̂/(1 − λ/2) + (KL + penalty + ln(2√n/δ))/(nλ(1 − λ/2)); λ = its minimiser if None.

    The minimiser (Thiemann et al. 2017) is λ* = 2/(√(2nL̂/(KL + ln(2√n/δ)) + 1) + 1).
    """
    num = complexity(kl, n, delta, "maurer", penalty) * n
    if lam is None:
        lam = 2.0 / (math.sqrt(2.0 * n * emp / num + 1.0) + 1.0)
    if not 0.0 < lam < 2.0:
        raise KfacboundError(f"the λ-bound needs λ in (0, 2), got {lam}")
    return min(1.0, emp / (1.0 - lam / 2.0) + num / (n * lam * (1.0 - lam / 2.0)))


CATONI_GRID = tuple(2.0 ** k for k in range(-3, 6))


def catoni_bound(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0,
                 cs: tuple[float, ...] = CATONI_GRID) -> float:
    """min over C in ``cs`` of (1 − exp(−C L̂ − (KL + penalty + ln(|cs|/δ))/n)) / (1 − exp(−C)).

    A union bound over the |cs| values of C (each at confidence δ/|cs|) makes the minimum valid.
    """
    _check(n, delta)
    num = kl + penalty + math.log(len(cs) / delta)
    return min(
        min(1.0, -math.expm1(-C * emp - num / n) / -math.expm1(-C)) for C in cs
    )


def all_bounds(emp: float, kl: float, n: int, delta: float, penalty: float = 0.0) -> dict:
    """Every formula on the same (L̂, KL, n, δ, grid penalty), for comparison tables.

    Only one formula may be chosen *before* looking at these numbers; taking the minimum over
    them afterwards is not a certificate at confidence 1 − δ.
    """
    return {
        "maurer": maurer_bound(emp, kl, n, delta, penalty),
        "dr": dr_bound(emp, kl, n, delta, penalty),
        "mcallester": mcallester_bound(emp, kl, n, delta, "maurer", penalty),
        "mcallester_dr": mcallester_bound(emp, kl, n, delta, "dr", penalty),
        "quadratic": quadratic_bound(emp, kl, n, delta, penalty),
        "lambda": lambda_bound(emp, kl, n, delta, penalty),
        "catoni": catoni_bound(emp, kl, n, delta, penalty),
    }


# ----------------------------------------------------------------------------- Monte Carlo


def mc_error_bound(mc_error: float, mc_samples: int, delta_prime: float) -> float:
    """kl⁻¹(ê_N, ln(1/δ′)/N): with probability 1 − δ′ an upper bound on L̂(Q)."""
    if mc_samples < 1:
        raise KfacboundError("the Monte-Carlo bound needs at least one sample")
    if not 0.0 < delta_prime < 1.0:
        raise KfacboundError(f"delta_prime must be in (0, 1), got {delta_prime}")
    return kl_inv(mc_error, math.log(1.0 / delta_prime) / mc_samples)


# ----------------------------------------------------------------------------- Gaussian KL


def kl_isotropic_terms(
    sq_dist: torch.Tensor | float,
    sum_var: torch.Tensor | float,
    sum_log_var: torch.Tensor | float,
    k: int,
    lam: torch.Tensor | float,
):
    """KL(N(μ, Σ) ‖ N(w0, λI)) from its sufficient statistics, in nats.

    KL = ½ [ tr Σ / λ + ‖μ − w0‖² / λ − k + k ln λ − ln det Σ ], with sq_dist = ‖μ − w0‖²,
    sum_var = tr Σ = Σ s, sum_log_var = ln det Σ = Σ ln s, k = dimension. The eigenbasis U of
    Σ = U diag(s) Uᵀ does not enter: the prior is isotropic. Differentiable in every argument.
    """
    log_lam = torch.log(lam) if isinstance(lam, torch.Tensor) else math.log(lam)
    return 0.5 * ((sum_var + sq_dist) / lam - k + k * log_lam - sum_log_var)


def kl_gaussian_isotropic(
    mu: torch.Tensor,
    var: torch.Tensor,
    w0: torch.Tensor | None,
    lam: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(μ, U diag(var) Uᵀ) ‖ N(w0, λI)) for any orthogonal U (w0 = None means 0)."""
    diff = mu if w0 is None else mu - w0
    return kl_isotropic_terms(
        (diff * diff).sum(), var.sum(), torch.log(var).sum(), mu.numel(), lam
    )


def optimal_prior_variance(sq_dist: float, sum_var: float, k: int) -> float:
    """argmin_λ KL = (tr Σ + ‖μ − w0‖²)/k (a starting point for the learned λ)."""
    return (float(sum_var) + float(sq_dist)) / k
