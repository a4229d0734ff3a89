"""Certification of a trained (Q, P): Monte-Carlo, λ rounding, the bound, the JSON, its recompute.

Steps (SCIENCE.md §5), for a posterior Q and prior P already optimised (:mod:`.optimize`):

1. λ is rounded to the grid λ_j = c·exp(−j/b) (Dziugaite & Roy 2017): the neighbouring integers
   j ≥ 1 of the learned value are tried and the one with the smaller KL + 2 ln j wins (the union
   bound covers every j, so the choice may look at the data). The KL is computed in float64
   *after* the last optimiser step with this λ_j; a curvature prior rounds τ on its grid too.
2. Monte-Carlo: every example of the bound set gets an independent network from Q, in each of
   ``mc_passes`` passes; N = n·passes independent Bernoulli draws with mean L̂(Q), so
   L̂(Q) ≤ kl⁻¹(ê_N, ln(1/δ′)/N) with probability 1 − δ′.
3. Bound = kl⁻¹(kl⁻¹(ê_N, ln(1/δ′)/N), B), B = (KL + 2 ln j + ln(π²/6) + ln(2√n/δ))/n
   (``formula='maurer'``, default) or (… + ln(n/δ))/(n − 1) (``'dr'``), holding with
   probability ≥ 1 − δ − δ′. The other formulas are reported for comparison only.

:func:`certify_posterior` returns the certificate's terms, :func:`recompute_certificate`
recomputes ``bound`` from the JSON alone, and :class:`Certificate` holds Q, P and the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint import atomic_write_text
from ..errors import KfacboundError
from ..losses import zero_one_errors
from ..progress import progress_bar
from .kron_prior import (
    TAU_GRID,
    KronPrior,
    kl_from_terms,
    round_kron_prior,
    tau_penalty,
)
from .optimize import P_MIN, bounded_cross_entropy
from .pacbayes import (
    FORMULAS,
    GRID_B,
    GRID_C,
    all_bounds,
    complexity,
    grid_candidates,
    grid_lambda,
    grid_penalty,
    kl_inv,
    kl_isotropic_terms,
    mc_error_bound,
)
from .posteriors import GaussianPosterior
from .prior import IsotropicPrior
from .select import Selection, shares_prior

if TYPE_CHECKING:
    from .config import CertifyConfig


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def deterministic_error(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 4096, device: str | torch.device = "cpu") -> float:
    """0-1 error of the deterministic network (eval mode)."""
    model = model.to(device).eval()
    wrong = 0
    for s in range(0, len(X), batch_size):
        xb, yb = X[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        wrong += int(zero_one_errors(model(xb), yb).sum())
    return wrong / max(len(X), 1)


@torch.no_grad()
def mc_errors(posterior: GaussianPosterior, X: torch.Tensor, y: torch.Tensor, passes: int = 1,
              batch_size: int = 8192, seed: int = 0, device: str | torch.device = "cpu",
              progress: bool = True) -> tuple[int, int]:
    """(number of errors, N = len(X)·passes): :func:`mc_draws` without the bounded CE."""
    wrong, total, _ = mc_draws(posterior, X, y, passes, batch_size, seed, device, progress)
    return wrong, total


@torch.no_grad()
def mc_draws(posterior: GaussianPosterior, X: torch.Tensor, y: torch.Tensor, passes: int = 1,
             batch_size: int = 8192, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = True) -> tuple[int, int, float]:
    """(number of errors, N = len(X)·passes, Σ bounded CE) with an independent network from Q
    per example and pass; the bounded cross-entropy (:func:`.optimize.bounded_cross_entropy`,
    values in [0, 1]) is summed over the same N draws.

    Linear layers use the local reparameterisation (independent noise per example), conv layers
    draw a whole kernel per example, so the N 0/1 outcomes are independent Bernoullis with mean
    exactly L̂(Q) (the expected error of Q on these examples). All passes over a chunk of
    examples are drawn together (:meth:`GaussianPosterior.forward_repeated`), so the first
    layer's deterministic part is computed once per example; ``batch_size`` counts draws
    (examples × passes) per chunk.
    """
    posterior = posterior.to(device).eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))
    wrong, ce = 0, 0.0
    total = passes * len(X)
    try:
        chunk = max(1, batch_size // max(passes, 1))
        with progress_bar(total, "MC samples", progress, unit="draw", leave=False) as bar:
            for s in range(0, len(X), chunk):
                xb, yb = X[s:s + chunk].to(device), y[s:s + chunk].to(device)
                out = posterior.forward_repeated(xb, passes)
                out = out.reshape(passes * len(xb), *out.shape[2:])
                yr = yb.repeat(passes, *[1] * (yb.ndim - 1))
                wrong += int(zero_one_errors(out, yr).sum())
                ce += float(bounded_cross_entropy(out.double(), yr, reduction="none").sum())
                bar.update(passes * len(xb))
    finally:
        torch.random.set_rng_state(state)
    return wrong, total, ce


@torch.no_grad()
def round_lambda(posterior: GaussianPosterior, prior: IsotropicPrior
                 ) -> tuple[int, float, float, dict[str, float | int]]:
    """(j, λ_j, KL at λ_j, KL's terms) for the better neighbouring grid index j ≥ 1, in float64.

    "Better" = smaller KL + 2 ln j, i.e. smaller complexity B (the bound is increasing in B).
    The KL's sufficient statistics (‖μ − w0‖², tr Σ, ln det Σ, k) are computed once; only λ
    changes between candidates.
    """
    sq, sv, sl, k = posterior.kl_terms(prior, torch.float64)
    terms = {"sq_dist": float(sq), "trace_sigma": float(sv), "logdet_sigma": float(sl),
             "k": int(k)}
    best = None
    for j in grid_candidates(float(prior.lam.detach()), prior.c, prior.b):
        lam = grid_lambda(j, prior.c, prior.b)
        kl = float(kl_isotropic_terms(terms["sq_dist"], terms["trace_sigma"],
                                      terms["logdet_sigma"], terms["k"], lam))
        score = kl + grid_penalty(j)
        if best is None or score < best[0]:
            best = (score, j, lam, kl)
    assert best is not None
    return best[1], best[2], best[3], terms


@torch.no_grad()
def layer_kl_terms(posterior: GaussianPosterior, prior: IsotropicPrior | KronPrior, lam: float,
                   tau: float | None = None) -> list[dict[str, Any]]:
    """Each layer's share of KL(Q‖P) at the certified (λ_j, τ_k), in float64.

    Both priors factorise over layers, so KL = Σ_l KL_l with the same formula per layer: for
    N(w0, λI), KL_l = ½[(tr Σ_l + ‖μ_l − w0_l‖²)/λ − k_l + k_l ln λ − ln det Σ_l]; for the
    curvature prior, KL_l = ½[Σ π s² + Σ π R² − k_l − Σ ln π − Σ ln s²] over the layer's
    entries. Each entry holds the layer's terms (the fields of ``kl_terms``) and ``kl``;
    :func:`recompute_certificate` checks that they sum to ``kl_terms`` and give each ``kl``.
    This is the per-layer breakdown the BatchNorm study reads (which layers pay for the bound).
    """
    out = []
    for path, layer in posterior.layers():
        if isinstance(prior, KronPrior):
            t = prior.kl_terms([(path, layer)], lam=lam, tau=tau, dtype=torch.float64)
            terms = {key: (float(v) if key != "k" else int(v)) for key, v in t.items()}
            kl = float(kl_from_terms(terms))
        else:
            mean = layer.mean.to(torch.float64)
            w0 = prior.center(path)
            diff = mean if w0 is None else mean - w0.to(torch.float64)
            v, lv = layer.var_stats(torch.float64)
            terms = {"sq_dist": float((diff * diff).sum()), "trace_sigma": float(v),
                     "logdet_sigma": float(lv), "k": int(layer.numel())}
            kl = float(kl_isotropic_terms(terms["sq_dist"], terms["trace_sigma"],
                                          terms["logdet_sigma"], terms["k"], lam))
        out.append({"layer": path, **terms, "kl": kl})
    return out


def _check_layer_kl(d: Mapping[str, Any], lam: float, kron: bool) -> None:
    """``kl_layers`` must sum to ``kl_terms`` and each entry must give its own ``kl``."""
    rows = d.get("kl_layers")
    if not rows or "kl_terms" not in d:
        return
    total = d["kl_terms"]
    for key, val in total.items():
        if key in ("prior", "tau", "n_prior"):
            continue
        s = sum(float(r[key]) for r in rows)
        if not math.isclose(s, float(val), rel_tol=1e-8, abs_tol=1e-6):
            raise KfacboundError(f"certificate kl_layers' {key} sum to {s}, not {val}")
    for r in rows:
        kl = float(kl_from_terms(r)) if kron else float(kl_isotropic_terms(
            r["sq_dist"], r["trace_sigma"], r["logdet_sigma"], _integer(r["k"], "k"), lam))
        if not math.isclose(kl, float(r["kl"]), rel_tol=1e-8, abs_tol=1e-6):
            raise KfacboundError(f"certificate KL of layer {r['layer']!r} differs from its "
                                 f"terms ({kl} against {r['kl']})")


def kl_anatomy(d: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the KL of an isotropic-prior certificate is made of, from its JSON alone.

    With P = N(w0, λI) at the certified λ and, per layer l, the ``kl_layers`` statistics
    (‖μ_l − w0_l‖², tr Σ_l, ln det Σ_l, k_l):

    - ``distance``: Σ_l ‖μ_l − w0_l‖² / (2λ), the part paid for moving the mean from the
      prior's; ``variance``: the rest, ½ Σ_l [tr Σ_l/λ − k_l + k_l ln λ − ln det Σ_l];
    - ``kl_layer_lambda``: the KL of the *same* Q under one prior variance per layer, each at
      its minimiser λ_l* = (tr Σ_l + ‖μ_l − w0_l‖²)/k_l, i.e. Σ_l ½[k_l ln λ_l* − ln det Σ_l],
      with no union-bound cost for choosing the λ_l: KL − ``kl_layer_lambda`` is the most that
      matching the prior variance to each layer's scale could save for this Q (a diagnostic,
      not a bound: a certificate with per-layer variances pays a grid penalty per layer).
    - ``layers``: {layer: {distance, variance, lambda_star}}.

    Returns None for certificates without per-layer terms or with the curvature prior (τ set).
    """
    rows = d.get("kl_layers")
    if not rows or d.get("tau") is not None:
        return None
    lam = float(d["lambda"])
    layers, dist, var, star = {}, 0.0, 0.0, 0.0
    for r in rows:
        k = _integer(r["k"], "k")
        sq, tr, ld = float(r["sq_dist"]), float(r["trace_sigma"]), float(r["logdet_sigma"])
        d_l = sq / (2 * lam)
        v_l = 0.5 * (tr / lam - k + k * math.log(lam) - ld)
        lam_l = (tr + sq) / k
        layers[r["layer"]] = {"distance": d_l, "variance": v_l, "lambda_star": lam_l}
        dist, var, star = dist + d_l, var + v_l, star + 0.5 * (k * math.log(lam_l) - ld)
    return {"kl": dist + var, "distance": dist, "variance": var, "kl_layer_lambda": star,
            "lambda": lam, "layers": layers}


def certify_posterior(
    posterior: GaussianPosterior,
    prior: IsotropicPrior,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    delta: float = 0.025,
    delta_prime: float = 0.01,
    mc_passes: int = 10,
    formula: str = "maurer",
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 8192,
    progress: bool = True,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """The certificate terms for a trained (Q, P) on the bound set (X, y), n = len(X).

    ``selection``: this Q is one of m candidates of a selection (:mod:`.select`); the PAC-Bayes
    and MC steps then use the per-candidate budgets (δ or δ/m, δ′/m) so that the best candidate
    still holds at 1 − δ − δ′.
    """
    if formula not in FORMULAS:
        raise KfacboundError(f"unknown formula {formula!r}; choose from {', '.join(FORMULAS)}")
    n = len(X)
    d_each, dp_each = (delta, delta_prime) if selection is None else selection.budgets(
        delta, delta_prime)
    if isinstance(prior, KronPrior):
        j, lam, tau, kl, kl_terms = round_kron_prior(posterior, prior)
        penalty = grid_penalty(j) + tau_penalty()
    else:
        j, lam, kl, kl_terms = round_lambda(posterior, prior)
        tau, penalty = None, grid_penalty(j)
    kl_layers = layer_kl_terms(posterior, prior, lam, tau)
    wrong, N, ce_sum = mc_draws(posterior, X, y, mc_passes, batch_size, seed, device, progress)
    mc_error = wrong / N
    mc_ub = mc_error_bound(mc_error, N, dp_each)
    B = complexity(kl, n, d_each, formula, penalty)
    bound = kl_inv(mc_ub, B)
    ce_mean = min(1.0, ce_sum / N)
    ce_ub = mc_error_bound(ce_mean, N, dp_each)  # kl-Chernoff holds for [0, 1] losses too
    return {
        "n": n,
        "delta": delta,
        "delta_prime": delta_prime,
        "kl": kl,
        "kl_terms": kl_terms,
        "kl_layers": kl_layers,
        "j": j,
        "lambda": lam,
        "mc_samples": N,
        "mc_errors": wrong,
        "mc_error": mc_error,
        "mc_error_bound": mc_ub,
        "bound": bound,
        "formula": formula,
        "grid": {"c": prior.c, "b": prior.b},
        "tau": tau,
        "tau_grid": list(TAU_GRID) if tau is not None else None,
        "grid_penalty": penalty,
        "complexity": B,
        "confidence": 1.0 - delta - delta_prime,
        "bounds": all_bounds(mc_ub, kl, n, d_each, penalty),
        "mc_passes": mc_passes,
        "mc_seed": int(seed),
        "num_params": posterior.numel(),
        "selection": None if selection is None else selection.to_json(delta, delta_prime),
        # The same certificate for PBB's bounded cross-entropy (a [0, 1] loss) on the same draws:
        # a separate statement, also at confidence 1 − δ − δ′ (not jointly with the 0-1 bound).
        "bounded_ce": {"p_min": P_MIN, "mc_mean": ce_mean, "mc_bound": ce_ub,
                       "bound": kl_inv(ce_ub, B)},
    }


def recompute_certificate(d: Mapping[str, Any]) -> float:
    """The bound a certificate states, recomputed from its JSON fields alone.

    Rejects (:class:`KfacboundError`) a certificate whose parts do not fit together:

    - j is not an integer ≥ 1, or λ is not the grid value c·exp(−j/b);
    - N ≠ n × passes, ê_N ≠ errors/N;
    - the stated confidence is not 1 − δ − δ′;
    - ``kl_terms`` (‖μ − w0‖², tr Σ, ln det Σ, k) do not give the stated KL
      ½[(tr Σ + ‖μ − w0‖²)/λ − k + k ln λ − ln det Σ] at λ_j, or k ≠ ``num_params``;
    - the per-layer ``kl_layers`` do not sum to ``kl_terms`` or do not give their own KLs;
    - n + ``prior.prior_n`` (0 for a data-free prior) ≠ the training-set size recorded in
      ``dataset.size``;
    - a ``selection`` whose per-candidate budgets are not (δ or δ/m, δ′/m) (:mod:`.select`).

    Then returns kl⁻¹(kl⁻¹(ê_N, ln(1/δ′_c)/N), B) with B per ``d['formula']`` (default
    'maurer') at δ_c, where (δ_c, δ′_c) = (δ, δ′) or the selection's per-candidate budgets.
    Compare the result with ``d['bound']``. Fields missing from certificates written by older
    versions are not checked. Not checkable from the JSON alone: that the curvature prior's
    stored per-layer terms were taken at λ_j and τ (they need the prior's factors, which the
    certificate does not hold), and that the prior centre is the one named by
    ``prior.center_sha256`` (that needs w0 or the prior split).
    """
    grid = d.get("grid", {"c": GRID_C, "b": GRID_B})
    j = _integer(d["j"], "grid index j")
    if j < 1:
        raise KfacboundError("certificate has grid index j < 1")
    lam = grid_lambda(j, grid["c"], grid["b"])
    if not math.isclose(lam, float(d["lambda"]), rel_tol=1e-9):
        raise KfacboundError(f"certificate λ={d['lambda']} is not grid point j={j} ({lam})")
    n = _integer(d["n"], "n")
    N = _integer(d["mc_samples"], "mc_samples")
    if "mc_passes" in d and N != n * _integer(d["mc_passes"], "mc_passes"):
        raise KfacboundError(f"certificate has N = {N} draws, not n × passes")
    delta, delta_prime = float(d["delta"]), float(d["delta_prime"])
    if "confidence" in d and not math.isclose(
            float(d["confidence"]), 1.0 - delta - delta_prime, rel_tol=1e-12):
        raise KfacboundError("certificate confidence is not 1 − δ − δ′")
    penalty = grid_penalty(j)
    kron = isinstance(d.get("kl_terms"), Mapping) and d["kl_terms"].get("prior") == "kron"
    if kron:  # curvature prior: λ and τ enter through π; its terms give the KL directly
        tau = float(d["tau"])
        if tau not in TAU_GRID or [float(t) for t in d.get("tau_grid", TAU_GRID)] != list(
                TAU_GRID) or float(d["kl_terms"]["tau"]) != tau:
            raise KfacboundError(f"certificate τ = {tau} is not a point of the τ grid")
        penalty += tau_penalty()
    if "kl_terms" in d:
        t = d["kl_terms"]
        k = _integer(t["k"], "kl_terms.k")
        if "num_params" in d and k != _integer(d["num_params"], "num_params"):
            raise KfacboundError(
                f"certificate KL is over k = {k} parameters, but Q has {d['num_params']}")
        kl = float(kl_from_terms(t)) if kron else float(kl_isotropic_terms(
            t["sq_dist"], t["trace_sigma"], t["logdet_sigma"], k, lam))
        if not math.isclose(kl, float(d["kl"]), rel_tol=1e-9, abs_tol=1e-6):
            raise KfacboundError(f"certificate KL {d['kl']} differs from its terms ({kl})")
        _check_layer_kl(d, lam, kron)
    spec = d.get("dataset")
    size = spec.get("size") if isinstance(spec, Mapping) else None
    if size is not None:
        prior_n = (d.get("prior") or {}).get("prior_n") or 0
        if n + int(prior_n) != int(size):
            raise KfacboundError(
                f"certificate n = {n} plus prior_n = {prior_n} is not the training-set size "
                f"{size}: the bound set is not the part of the data the prior did not see")
    if "mc_errors" in d and not math.isclose(d["mc_errors"] / N, d["mc_error"], rel_tol=1e-12):
        raise KfacboundError("certificate mc_error differs from mc_errors / mc_samples")
    d_each, dp_each = delta, delta_prime
    if d.get("selection"):
        sel = d["selection"]
        split = {"prior_split": (d.get("prior") or {}).get("split")}
        if "candidates" in sel and bool(sel["shared_prior"]) and not shares_prior(
                split, [c.get("options", {}) for c in sel["candidates"]]):
            raise KfacboundError("certificate selection claims a shared prior, but its "
                                 "candidates differ in the prior or the formula, or the "
                                 "prior is data-dependent (trained once per candidate)")
        d_each, dp_each = Selection.from_json(sel).budgets(delta, delta_prime)
        for key, val in (("delta_each", d_each), ("delta_prime_each", dp_each)):
            if key in sel and not math.isclose(float(sel[key]), val, rel_tol=1e-12):
                raise KfacboundError(f"certificate selection.{key} = {sel[key]} is not {val}")
    mc_ub = mc_error_bound(float(d["mc_error"]), N, dp_each)
    B = complexity(float(d["kl"]), n, d_each, d.get("formula", "maurer"), penalty)
    return kl_inv(mc_ub, B)


def bound_after_trials(d: Mapping[str, Any], trials: int) -> float:
    """The bound of certificate ``d`` had its prior (and the rest of its recipe) been chosen
    among ``trials`` settings tried on the same data, recomputed from its JSON alone.

    A recipe tuned by certifying several settings on the data of the certificate (the prior's
    epochs or dropout, say) makes the prior depend on the bound set through that choice. A union
    bound over the settings restores validity: with each at (δ/K, δ′/K), K = ``trials``
    (:class:`.select.Selection` with m = K and no shared prior), every one of them holds at once
    with probability ≥ 1 − δ − δ′, so the chosen one does too. The K settings must be a set
    fixed independently of the outcomes, e.g. a grid that contains every setting tried, even if
    they were tried one after another. δ′/K is conservative: the Monte-Carlo step needs it only
    when the certification draws themselves informed the choice. The price is ln K in the
    PAC-Bayes complexity (K = 50, n = 30,000: ≈ 3.9/n) and ln K / N in the MC term.

    A certificate that is itself a selection among m candidates (``selection``, e.g. ``--recipe
    best``'s diag against K-FAC) becomes one of m·K candidates, none sharing a prior."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise KfacboundError(f"trials must be an integer ≥ 1, not {trials!r}")
    own = d.get("selection") or {}
    m = Selection.from_json(own).m if own else 1
    sel = Selection(m=m * trials, shared_prior=False)
    return recompute_certificate(
        {**d, "selection": {**own, **sel.to_json(float(d["delta"]), float(d["delta_prime"]))}})


def _integer(value: Any, name: str) -> int:
    """``value`` as an int, refusing non-integers (1.5, "3", True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise KfacboundError(f"certificate {name} must be an integer, not {value!r}")
    return int(value)




@dataclass
class Certificate:
    """A certified PAC-Bayes bound: the trained posterior Q, the prior P and the JSON record.

    ``record`` is the certificate as :func:`.certify.certify_checkpoint` returns it (the bound,
    the KL and its terms, the Monte-Carlo counts, the prior's provenance, …); ``config`` the
    options it was made with.
    """

    posterior: GaussianPosterior
    prior: IsotropicPrior | KronPrior
    record: dict[str, Any]
    config: CertifyConfig | None = None

    @property
    def bound(self) -> float:
        """The certified bound on the 0-1 error of Q (confidence ``record['confidence']``)."""
        return float(self.record["bound"])

    def to_json(self) -> dict[str, Any]:
        """The JSON-able record (the object itself, not a copy)."""
        return self.record

    def save(self, path: str | Path) -> None:
        """Write the record as pretty JSON, atomically."""
        atomic_write_text(path, json.dumps(self.record, indent=2) + "\n")

    def recompute(self) -> float:
        """The bound recomputed from the record alone (:func:`recompute_certificate`)."""
        return recompute_certificate(self.record)
