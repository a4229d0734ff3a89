"""Train a posterior Q and the prior variance λ on the Dziugaite & Roy objective.

Objective (Dziugaite & Roy 2017, §4, with a choice of complexity form):

    J(Q, λ) = surrogate(Q) + √(B/2),

- surrogate: the expected loss of a network drawn from Q (one draw per example by the local
  reparameterisation; conv layers one kernel per mini-batch, see posteriors.py) in *bits*: the
  logistic loss / ln 2 for one logit, the cross-entropy / ln 2 for C classes. Both upper-bound the
  0-1 loss (a wrong arg-max means p_y ≤ ½, i.e. −log₂ p_y ≥ 1).
- B: the complexity term of the certificate, with the union-bound penalty over the λ grid
  evaluated at the continuous index j = b ln(c/λ) (clamped to j ≥ 1):
  ``formula='maurer'`` (default): B = (KL + 2 ln j + ln(π²/6) + ln(2√n/δ)) / n;
  ``formula='dr'``: B = (KL + 2 ln j + ln(π²/6) + ln(n/δ)) / (n − 1) (their B_RE).
  √(B/2) is the Pinsker (McAllester) relaxation of kl⁻¹(L̂, B) − L̂, as in their paper.

Objectives (``objective=``), with L̃ the batch mean of the surrogate and B as above (Maurer form:
B = (KL + grid penalty + ln(2√n/δ))/n):

- ``'pinsker'`` (default): L̃ + √(B/2). With ``formula='maurer'`` this is PBB's **f_classic**
  (Pérez-Ortiz et al. 2021, eq. 8: L̂ + √((KL + ln(2√n/δ))/(2n))) plus the λ-grid penalty.
- ``'quad'``: PBB's **f_quad** (their eq. 9), (√(L̃ + B/2) + √(B/2))².
- ``'lambda'``: **f_λ** (Thiemann et al. 2017; PBB eq. 10), L̃/(1 − λ/2) + B/(λ(1 − λ/2)) with
  λ ∈ (0, 2) set every step to its minimiser λ* = 2/(√(2L̃/B + 1) + 1) at the current (detached)
  L̃, B — the alternating minimisation of Thiemann et al.; not to be confused with the prior
  variance λ of P.
- ``'kl'``: kl⁻¹(L̃, B) itself, with implicit-function gradients (:class:`KLInverse`).

The quad, λ and kl forms need L̃ ∈ [0, 1]: the bits surrogate is clipped at 1 (still ≥ the 0-1
loss). ``surrogate='bounded-ce'`` instead uses PBB's bounded cross-entropy
ℓ = −ln max(p_y, p_min) / ln(1/p_min) ∈ [0, 1] (:func:`bounded_cross_entropy`), which is not an
upper bound of the 0-1 loss; the certificate always bounds the 0-1 error (and reports the
bounded-CE certificate beside it).

Optimiser: ``optimizer='rmsprop'`` (D&R's; lr 1e-3, batch 100) or ``'adam'``. λ is trained
through log λ and rounded to the grid by the certificate, not here. Learning-rate schedule
(``schedule=``): ``'step'`` with ``lr_decay=(f, γ)`` multiplies every learning rate by γ for the
last fraction f of the steps (with a constant rate the final iterate keeps the noise of the
stochastic gradients, a short low-rate phase settles it; not part of D&R's recipe); ``'cosine'``
scales every rate by ½(1 + cos(π t/T)) at step t of T (``lr_decay`` is then not used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import KfacboundError
from ..progress import progress_bar
from .families import posterior_family
from .kron_prior import posterior_kl, prior_penalty
from .pacbayes import complexity, kl_inv
from .posteriors import GaussianPosterior
from .prior import IsotropicPrior

LN2 = math.log(2.0)
OBJECTIVES = ("pinsker", "quad", "lambda", "kl")
OPTIMIZERS = ("rmsprop", "adam")
LR_SCHEDULES = ("step", "cosine")
SURROGATES = ("bits", "bounded-ce")
#: PBB's probability floor of the bounded cross-entropy.
P_MIN = 1e-5
#: Each objective in words, as the certificate records it (L: the surrogate, B: the formula).
OBJECTIVE_TEXT = {
    "pinsker": "{L} + sqrt(B/2), B={formula}",
    "quad": "(sqrt({L} + B/2) + sqrt(B/2))^2, B={formula}",
    "lambda": "{L}/(1 - l/2) + B/(l (1 - l/2)), l optimal, B={formula}",
    "kl": "kl_inv({L}, B), B={formula}",
}


def surrogate_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
                   ) -> torch.Tensor:
    """Surrogate of the 0-1 loss in bits: logistic/ln 2 (one logit) or cross-entropy/ln 2."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits.reshape(-1), y.reshape(-1).to(logits.dtype), reduction=reduction
        ) / LN2
    return F.cross_entropy(logits, y.long(), reduction=reduction) / LN2


def bounded_cross_entropy(logits: torch.Tensor, y: torch.Tensor, p_min: float = P_MIN,
                          reduction: str = "mean") -> torch.Tensor:
    """PBB's bounded cross-entropy −ln max(p_y, p_min) / ln(1/p_min) ∈ [0, 1].

    One logit: p_1 = σ(f), p_0 = 1 − σ(f); C logits: p = softmax(f). The log-probability is
    clamped at ln p_min before scaling, so the loss lies in [0, 1] (Pérez-Ortiz et al. 2021, §5).
    """
    if logits.ndim == 1 or logits.shape[-1] == 1:
        f = logits.reshape(-1)
        sign = 2.0 * y.reshape(-1).to(f.dtype) - 1.0
        logp = F.logsigmoid(sign * f)
    else:
        logp = F.log_softmax(logits, dim=-1).gather(-1, y.long().reshape(-1, 1)).reshape(-1)
    loss = -logp.clamp(min=math.log(p_min)) / math.log(1.0 / p_min)
    return loss.mean() if reduction == "mean" else loss


def training_objective(sur: torch.Tensor, B: torch.Tensor, objective: str) -> torch.Tensor:
    """The objective's value from L̃ (``sur``, in [0, 1] except for 'pinsker') and B.

    See the module docstring: pinsker/f_classic L̃ + √(B/2); f_quad (√(L̃ + B/2) + √(B/2))²;
    f_λ L̃/(1 − λ*/2) + B/(λ*(1 − λ*/2)) at λ* = 2/(√(2L̃/B + 1) + 1); kl kl⁻¹(L̃, B).
    """
    if objective == "pinsker":
        return sur + torch.sqrt(B / 2)
    if objective == "quad":
        half = B / 2
        return (torch.sqrt(sur + half) + torch.sqrt(half)) ** 2
    if objective == "lambda":
        with torch.no_grad():
            lam = 2.0 / (torch.sqrt(2.0 * sur.clamp(min=0.0) / B + 1.0) + 1.0)
        return sur / (1.0 - lam / 2.0) + B / (lam * (1.0 - lam / 2.0))
    if objective == "kl":
        return KLInverse.apply(sur.double(), B.double())
    raise KfacboundError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")


class KLInverse(torch.autograd.Function):
    """p = kl⁻¹(q, B) with implicit-function gradients (Pérez-Ortiz et al. 2021's "f-classic").

    From kl(q‖p) = B: ∂p/∂B = 1/∂₂kl, ∂p/∂q = −∂₁kl/∂₂kl, with ∂₂kl = (p − q)/(p(1 − p)) and
    ∂₁kl = ln(q/p) − ln((1 − q)/(1 − p)).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        qf = min(max(float(q), 0.0), 1.0)
        p = kl_inv(qf, max(float(B), 0.0))
        ctx.save_for_backward(q, B)
        ctx.vals = (qf, p)
        return torch.tensor(p, dtype=torch.float64, device=q.device)

    @staticmethod
    def backward(ctx, grad):
        qf, p = ctx.vals
        eps = 1e-12
        qc = min(max(qf, eps), 1 - eps)
        pc = min(max(p, qc + eps), 1 - eps)
        d2 = (pc - qc) / (pc * (1 - pc))
        d1 = math.log(qc / pc) - math.log((1 - qc) / (1 - pc))
        if d2 < 1e-9:  # B ≈ 0: p = q locally
            return grad, grad * 0.0
        return grad * (-d1 / d2), grad / d2


def objective_complexity(kl: torch.Tensor, prior: IsotropicPrior, n: int, delta: float,
                         formula: str = "maurer") -> torch.Tensor:
    """B(KL, λ) as a differentiable tensor (grid penalty at the continuous j, clamped ≥ 1)."""
    j = prior.b * (math.log(prior.c) - prior.log_lam)
    j = torch.clamp(j, min=1.0)
    penalty = 2 * torch.log(j) + math.log(math.pi**2 / 6)
    penalty = penalty + prior_penalty(prior)  # τ grid of a curvature prior (constant)
    const = complexity(0.0, n, delta, formula)  # (ln-term)/n or /(n−1), KL = 0
    denom = n if formula == "maurer" else n - 1
    return (kl + penalty) / denom + const


def objective_text(objective: str, surrogate: str, formula: str) -> str:
    """The objective that :func:`optimize_posterior` minimises, in words (:data:`OBJECTIVE_TEXT`)
    with L the surrogate actually used: the bounded CE, the bits, or the bits clipped at 1."""
    L = ("bounded_ce" if surrogate == "bounded-ce" else
         "surrogate_bits" if objective == "pinsker" else "min(1, surrogate_bits)")
    return OBJECTIVE_TEXT[objective].format(L=L, formula=formula)


def lr_decay_step(lr_decay: Sequence[float] | None, iterations: int) -> int | None:
    """The step from which every learning rate is multiplied by γ, for ``lr_decay=(f, γ)``: the
    last fraction f of the ``iterations`` steps; None (constant rates) for None or f ≤ 0.
    Refuses anything but a pair with f in (0, 1) and γ > 0."""
    if lr_decay is None:
        return None
    if isinstance(lr_decay, str | bytes) or len(lr_decay) != 2:
        raise KfacboundError(f"lr_decay must be a pair (fraction, factor), not {lr_decay!r}")
    frac, gamma = float(lr_decay[0]), float(lr_decay[1])
    if frac <= 0.0:
        return None
    if not (0.0 < frac < 1.0 and gamma > 0.0):
        raise KfacboundError(
            f"lr_decay must be (fraction in (0, 1), factor > 0), not {lr_decay}")
    return int(round((1.0 - frac) * iterations))


def lr_factor(step: int, iterations: int, schedule: str = "step",
              lr_decay: Sequence[float] | None = None) -> float:
    """The factor on every base learning rate at ``step`` (0-based) of ``iterations``:
    'step': γ from :func:`lr_decay_step` on (``lr_decay=(f, γ)``), else 1; 'cosine':
    ½(1 + cos(π · step / iterations)), from 1 at step 0 towards 0 at the last step."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(1, iterations)))
    if schedule != "step":
        raise KfacboundError(f"unknown schedule {schedule!r}; choose from {LR_SCHEDULES}")
    start = lr_decay_step(lr_decay, iterations)
    return float(lr_decay[1]) if start is not None and step >= start else 1.0


@dataclass
class TrainLog:
    """History of the optimisation (every ``log_every`` steps)."""

    step: list[int] = field(default_factory=list)
    surrogate: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    bound_estimate: list[float] = field(default_factory=list)


def optimize_posterior(
    posterior: GaussianPosterior,
    prior: IsotropicPrior,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    n: int | None = None,
    iterations: int = 20000,
    batch_size: int = 100,
    lr: float = 1e-3,
    mean_lr: float | None = None,
    lr_decay: tuple[float, float] | None = None,
    optimizer: str = "rmsprop",
    schedule: str = "step",
    delta: float = 0.025,
    formula: str = "maurer",
    objective: str = "pinsker",
    surrogate: str = "bits",
    train_mean: bool = True,
    train_prior: bool = True,
    basis_every: int | None = None,
    factors_fn: Callable[[torch.nn.Module], Mapping[str, tuple[torch.Tensor, torch.Tensor]]]
    | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    log_every: int = 100,
    cache_first_layer: bool | None = None,
) -> TrainLog:
    """Minimise the objective over (M, log-std, log λ); returns the history.

    ``mean_lr``: learning rate of the means (default ``lr``; the stds and log λ use ``lr``).
    ``optimizer``: 'rmsprop' or 'adam'. ``schedule='step'``: ``lr_decay=(f, γ)`` multiplies all
    learning rates by γ for the last fraction f of the steps (``None`` or f = 0: constant
    rates); ``'cosine'``: every rate × ½(1 + cos(π t/T)), ``lr_decay`` unused.
    ``X, y``: the bound set (n = len(X) unless given). ``basis_every``: every that many steps,
    the posterior's family refreshes Q with the curvature ``factors_fn(posterior.mean_model())``
    at the current mean (:meth:`.families.PosteriorFamily.refresh`; the kfac family moves to the
    new Kronecker eigenbasis, the "iter" variant); families without a refresh ignore it.
    The progress bar shows the smoothed surrogate (bits), the KL, λ and a running bound
    estimate min(1, surrogate + √(B/2)) — a pessimistic proxy, since the surrogate upper-bounds
    the 0-1 loss; the certified value comes from :mod:`kfacbound.bounds.certify`.
    ``cache_first_layer`` (default: whenever it applies): compute the first linear layer's
    rotated input statistics (U_Aᵀã)² once for all of X (:meth:`.posteriors.GaussianPosterior.
    first_noise_inputs`, at most 1 GiB) instead of at every step; the same law and draws. Not
    with a basis refresh (the rotation changes).
    """
    if objective not in OBJECTIVES:
        raise KfacboundError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    if surrogate not in SURROGATES:
        raise KfacboundError(f"unknown surrogate {surrogate!r}; choose from {SURROGATES}")
    if optimizer not in OPTIMIZERS:
        raise KfacboundError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
    if schedule not in LR_SCHEDULES:
        raise KfacboundError(f"unknown schedule {schedule!r}; choose from {LR_SCHEDULES}")
    n = len(X) if n is None else int(n)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    posterior.to(device)
    prior.to(device)
    means = [p for name, p in posterior.named_parameters() if name.endswith(".mean")]
    others = [p for name, p in posterior.named_parameters() if not name.endswith(".mean")]
    if train_prior:
        others.extend(p for p in prior.parameters() if p.requires_grad)  # log λ (and log τ)
    groups = [{"params": others, "lr": lr}]
    if train_mean:
        groups.append({"params": means, "lr": lr if mean_lr is None else mean_lr})
    opt = (torch.optim.RMSprop if optimizer == "rmsprop" else torch.optim.Adam)(groups, lr=lr)
    base_lrs = [group["lr"] for group in opt.param_groups]
    family = posterior_family(posterior.kind) if basis_every and factors_fn is not None else None
    refresh = family.refresh if family is not None and family.refreshes else None
    cache = None
    if cache_first_layer is not False and refresh is None:
        cache = posterior.first_noise_inputs(X)
    log = TrainLog()
    posterior.train()
    bar = progress_bar(iterations, "posterior", progress, "step", range(iterations), leave=False)
    running = None
    for step in bar:
        scale = lr_factor(step, iterations, schedule, lr_decay)
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * scale
        if refresh is not None and step > 0 and step % basis_every == 0:
            refresh(posterior, factors_fn(posterior.mean_model()))
        idx = torch.randint(0, len(X), (batch_size,), generator=gen)
        xb, yb = X[idx].to(device), y[idx].to(device)
        if cache is not None:
            logits = posterior.forward_cached(xb, cache[idx].to(device), per_example=False)
        else:
            logits = posterior(xb, sample=True, per_example=False)
        kl = posterior_kl(posterior, prior)
        B = objective_complexity(kl, prior, n, delta, formula)
        if surrogate == "bounded-ce":
            sur = bounded_cross_entropy(logits, yb)
        elif objective == "pinsker":
            sur = surrogate_loss(logits, yb)
        else:  # the [0, 1] forms: the bits surrogate clipped at 1 (still ≥ the 0-1 loss)
            sur = surrogate_loss(logits, yb, reduction="none").clamp(max=1.0).mean()
        loss = training_objective(sur, B, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # smoothed on the device: no host sync except when logging
            s = sur.detach()
            running = s if running is None else 0.98 * running + 0.02 * s
        if step % log_every == 0 or step == iterations - 1:
            r = float(running)
            est = min(1.0, r + math.sqrt(float(B.detach()) / 2))
            log.step.append(step)
            log.surrogate.append(r)
            log.kl.append(float(kl.detach()))
            log.lam.append(float(prior.lam.detach()))
            log.bound_estimate.append(est)
            # (the float32 training KL of Q ≈ P can round below 0; the certificate's is float64)
            bar.set_postfix(sur=f"{r:.4f}", kl=f"{max(log.kl[-1], 0.0):.0f}",
                            lam=f"{log.lam[-1]:.2e}", bound=f"{est:.4f}")
    posterior.eval()
    return log
