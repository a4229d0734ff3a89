"""Certify a PAC-Bayes bound for a checkpoint: build Q and P, optimise, round λ, Monte-Carlo, JSON.

Pipeline of :func:`certify_checkpoint` (SCIENCE.md §5):

1. Fold eval-mode BatchNorm into the preceding layers, for the trained and the initial model
   (the prior is centred at the folded initialisation, which for fresh BN — γ=1, β=0, μ=0,
   σ²=1 — is the initialisation up to the ε of BN). The running statistics thereby become
   ordinary weights of the certified predictor: the bound covers exactly the deployed eval-mode
   network. With a data-free prior, w0 must not have seen the data, so the *initial* BN
   statistics are folded into w0, never the trained ones.
2. Data-dependent prior (``prior_split=f``): a seeded fraction f of the training set trains the
   prior mean by SGD from w0 (``prior_epochs``); the bound is certified on the rest, n = |rest|;
   the two index sets are checked to partition the training set (:func:`check_disjoint`).
3. Posterior Q (diag / kfac / exact) with mean at the trained weights — or, with a learnt prior
   and ``prior_scheme='pbb'``, at the prior mean, optimised on the whole training set; the λ of
   the prior N(w0, λI) is learned; :func:`optimize_posterior` minimises the chosen objective.
4. λ is rounded to the grid λ_j = c·exp(−j/b): the neighbouring integers j ≥ 1 of the learned
   value are tried and the one with the smaller KL + 2 ln j wins (the union bound covers every j,
   so the choice may look at the data). The KL is computed in float64 *after* the last optimiser
   step with this λ_j.
5. Monte-Carlo: every example of the bound set gets an independent network from Q, in each of
   ``mc_passes`` passes; N = n·passes independent Bernoulli draws with mean L̂(Q), so
   L̂(Q) ≤ kl⁻¹(ê_N, ln(1/δ′)/N) with probability 1 − δ′.
6. Bound = kl⁻¹(kl⁻¹(ê_N, ln(1/δ′)/N), B), B = (KL + 2 ln j + ln(π²/6) + ln(2√n/δ))/n
   (``formula='maurer'``, default) or (… + ln(n/δ))/(n − 1) (``'dr'``), holding with
   probability ≥ 1 − δ − δ′. The other formulas are reported for comparison only.

:func:`recompute_certificate` recomputes ``bound`` from the JSON alone.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import KfacboundError
from ..losses import default_loss, make_loss, prepare_targets, zero_one_errors
from ..models import count_parameters, fold_batchnorm, has_batchnorm
from ..progress import progress_bar
from .kron_prior import (
    TAU_GRID,
    KronPrior,
    kl_from_terms,
    posterior_kl,
    round_kron_prior,
    tau_penalty,
)
from .optimize import P_MIN, bounded_cross_entropy, optimize_posterior
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
from .posteriors import (
    GaussianPosterior,
    IsotropicPrior,
    build_posterior,
    build_prior,
    exact_eigenbasis,
)
from .select import Selection, shares_prior

CURVATURES = ("kflr", "kfac")
OBJECTIVE_TEXT = {
    "pinsker": "{L} + sqrt(B/2), B={formula}",
    "quad": "(sqrt({L} + B/2) + sqrt(B/2))^2, B={formula}",
    "lambda": "{L}/(1 - l/2) + B/(l (1 - l/2)), l optimal, B={formula}",
    "kl": "kl_inv({L}, B), B={formula}",
}

# Default optimiser: Dziugaite & Roy's RMSprop, 20,000 steps of batch 100 at lr 1e-3 (means, stds
# and λ alike). The faster recipe "fast" (RECIPES) was 3.4× faster end to end but 0.004 looser on
# binary Fashion-MNIST T-600 in the same-run comparison (benchmarks/RESULTS.md, "Certificate
# time"), so it is not the default.
DEFAULT_ITERATIONS = 20000
DEFAULT_LR = 1e-3
DEFAULT_MEAN_LR: float | None = None  # None: the same as DEFAULT_LR
DEFAULT_BATCH = 100
#: The fast optimiser settings: 2,000 steps of batch 500 (half the examples of the default),
#: stds and λ at lr 1e-2, means at 1e-3.
FAST_OPTIMIZER = {"iterations": 2000, "batch_size": 500, "lr": 1e-2, "mean_lr": 1e-3}
# Learning rates × 0.1 for the last quarter of the steps. Not in D&R's recipe; measured on binary
# Fashion-MNIST T-600 (20k steps, K-FAC posterior): 0.1716 without, 0.1580 with (results/bounds).
DEFAULT_LR_DECAY = (0.25, 0.1)


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
    versions are not checked.
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
        if "candidates" in sel and bool(sel["shared_prior"]) and not shares_prior(
                {}, [c.get("options", {}) for c in sel["candidates"]]):
            raise KfacboundError("certificate selection claims a shared prior, but its "
                                 "candidates differ in the prior or the formula")
        d_each, dp_each = Selection.from_json(sel).budgets(delta, delta_prime)
        for key, val in (("delta_each", d_each), ("delta_prime_each", dp_each)):
            if key in sel and not math.isclose(float(sel[key]), val, rel_tol=1e-12):
                raise KfacboundError(f"certificate selection.{key} = {sel[key]} is not {val}")
    mc_ub = mc_error_bound(float(d["mc_error"]), N, dp_each)
    B = complexity(float(d["kl"]), n, d_each, d.get("formula", "maurer"), penalty)
    return kl_inv(mc_ub, B)


def _integer(value: Any, name: str) -> int:
    """``value`` as an int, refusing non-integers (1.5, "3", True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise KfacboundError(f"certificate {name} must be an integer, not {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- curvature


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, tuple):
        return ds
    X, y = ds.tensors
    return X, y


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
    (kfacbound.curvature.spectral.top_eigenpairs on the matrix-free Hessian operator); the
    posterior then puts one shared variance on the orthogonal complement.
    """
    from ..curvature.exact import layer_hessian
    from ..curvature.layout import curvature_layers, layer_size
    from ..curvature.operators import hessian_operator
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
            op = hessian_operator(model, X, y, loss, path, device=device)
            evals, evecs = top_eigenpairs(op, kk)
            out[path] = (torch.as_tensor(evecs.copy()), torch.as_tensor(evals.copy()))
    return out


# ----------------------------------------------------------------------------- recipes

#: Named settings of certify_checkpoint. "fast": :data:`FAST_OPTIMIZER`. "best": the combination
#: that gave the tightest 0-1 certificates in our measurements (benchmarks/RESULTS.md,
#: "Certificate recipes"): the K-FAC posterior with a learnt prior (half the training set, PBB
#: scheme, 10 epochs), with the fast optimiser settings it was measured with.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": dict(FAST_OPTIMIZER),
    "best": {"posterior": "kfac", "prior_split": 0.5, "prior_scheme": "pbb",
             "prior_epochs": 10, "prior_kind": "isotropic", "objective": "pinsker",
             **FAST_OPTIMIZER},
}


def apply_recipe(name: str, options: Mapping[str, Any], explicit: set[str] | frozenset = frozenset()
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options with the recipe's values, what the recipe set): the recipe fills every option
    that is not in ``explicit`` (the ones the user gave)."""
    if name not in RECIPES:
        raise KfacboundError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    chosen = {k: v for k, v in RECIPES[name].items() if k not in explicit}
    return {**options, **chosen}, chosen


def expand_recipe(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with a ``recipe`` entry replaced by the recipe's settings (options given
    beside it win): what a batch spec's ``recipe = "best"`` means."""
    options = dict(options)
    name = options.pop("recipe", None)
    if name is None:
        return options
    return apply_recipe(str(name), options, explicit=set(options))[0]


# ----------------------------------------------------------------------------- priors

#: Epochs of SGD for a data-dependent prior mean (see benchmarks/RESULTS.md / results/bounds).
DEFAULT_PRIOR_EPOCHS = 10
PRIOR_SCHEMES = ("pbb", "checkpoint")
PRIOR_KINDS = ("isotropic", "curvature")


@torch.no_grad()
def curvature_prior(Q: GaussianPosterior, iso: IsotropicPrior, n_prior: int,
                    tau: float = 1.0) -> KronPrior:
    """The curvature prior in Q's (K-FAC) bases, centred where ``iso`` is, and Q's stds set to
    the prior's, s² = 1/π (then KL(Q‖P) = ½ Σ π R², zero when Q's mean is the prior mean)."""
    means, bases = {}, {}
    for path, layer in Q.layers():
        if not hasattr(layer, "U_G"):
            raise KfacboundError("the curvature prior needs the kfac posterior")
        means[path] = iso.center(path)
        bases[path] = (layer.U_G, layer.U_A, layer.eig_G, layer.eig_A)
    P = KronPrior(means, bases, n_prior=n_prior, lam=float(iso.lam), tau=tau, c=iso.c, b=iso.b)
    for i, (_path, layer) in enumerate(Q.layers()):
        pi = 1.0 / float(P.lam) + float(P.tau) * getattr(P, f"h_{i}")
        layer.log_std.copy_((-0.5 * torch.log(pi)).to(layer.log_std.dtype))
    return P


def check_disjoint(prior_idx: torch.Tensor, bound_idx: torch.Tensor, n_total: int) -> None:
    """Refuse a data-dependent prior that saw the bound set: the index sets must be disjoint
    and together cover the n_total training examples exactly once."""
    seen = torch.zeros(n_total, dtype=torch.int64)
    seen.index_add_(0, prior_idx.long(), torch.ones(len(prior_idx), dtype=torch.int64))
    overlap = int(((seen > 0) & torch.isin(torch.arange(n_total), bound_idx.long())).sum())
    if overlap:
        raise KfacboundError(
            f"the prior split and the bound split share {overlap} examples: a prior that saw "
            "the bound set gives no valid bound")
    seen.index_add_(0, bound_idx.long(), torch.ones(len(bound_idx), dtype=torch.int64))
    if not bool((seen == 1).all()):
        raise KfacboundError("the prior and bound splits do not partition the training set")


def _index_hash(idx: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()



def train_prior_mean(init_model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                     epochs: int = 1, lr: float = 0.01, momentum: float = 0.9,
                     batch_size: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = True) -> nn.Module:
    """A data-dependent prior mean: SGD from w0 on the prior split only (D&R's SGD settings)."""
    model = copy.deepcopy(init_model).to(device).train()
    crit = make_loss(loss)
    T = prepare_targets(loss, y, _num_outputs(model, X))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(int(seed) + 7)
    steps = epochs * math.ceil(len(X) / batch_size)
    for step in progress_bar(steps, "prior SGD", progress, "step", range(steps), leave=False):
        if step % math.ceil(len(X) / batch_size) == 0:
            perm = torch.randperm(len(X), generator=gen)
        s = (step % math.ceil(len(X) / batch_size)) * batch_size
        idx = perm[s:s + batch_size]
        out = model(X[idx].to(device))
        loss_v = crit(out, T[idx].to(device))
        opt.zero_grad()
        loss_v.backward()
        opt.step()
    return model.eval()


def _num_outputs(model: nn.Module, X: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model.eval()(X[:1]).shape[-1])


# ----------------------------------------------------------------------------- top level


def certify_checkpoint(
    ckpt_or_model: Any,
    dataset: Any = None,
    posterior: str = "diag",
    curvature: str = "kflr",
    iterations: int = DEFAULT_ITERATIONS,
    delta: float = 0.025,
    delta_prime: float = 0.01,
    mc_passes: int = 10,
    prior_split: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    *,
    init_model: nn.Module | None = None,
    test_dataset: Any = None,
    loss: str | None = None,
    formula: str = "maurer",
    objective: str = "pinsker",
    surrogate: str = "bits",
    lr: float = DEFAULT_LR,
    mean_lr: float | None = DEFAULT_MEAN_LR,
    lr_decay: tuple[float, float] | None = DEFAULT_LR_DECAY,
    batch_size: int = DEFAULT_BATCH,
    std_init: str | float = "dr",
    std_scale: float = 1.0,
    basis_every: int | None = None,
    exact_k: int | None = None,
    prior_epochs: int = DEFAULT_PRIOR_EPOCHS,
    prior_scheme: str = "pbb",
    prior_kind: str = "isotropic",
    c: float = GRID_C,
    b: float = GRID_B,
    mc_batch_size: int = 8192,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Optimise a Gaussian posterior for a checkpoint and return the JSON-able certificate.

    ``ckpt_or_model``: a path, a :class:`kfacbound.checkpoint.Checkpoint` or an ``nn.Module``
    (then pass ``init_model`` for w0, else a zero-centred prior is used with a warning).
    ``dataset``: a dataset name, a spec dict (``load_dataset`` keywords with ``name``), a
    ``TensorDataset`` / (X, y) tuple, or None for the checkpoint's training data. The test split
    is loaded when the dataset is named (or pass ``test_dataset``).
    ``basis_every``: recompute the K-FAC basis at the current mean every that many steps.
    ``lr_decay=(f, γ)``: learning rates × γ for the last fraction f of the steps (None or f = 0:
    constant rates, D&R's original schedule).
    ``selection``: this run is one candidate of a selection (see :func:`.select.certify_best`).
    ``prior_split=f``: data-dependent prior. The prior mean trains by SGD from w0 on a seeded
    fraction f of the training set for ``prior_epochs`` epochs; the bound is certified on the
    rest (n = its size). ``prior_scheme='pbb'`` (Pérez-Ortiz et al. 2021): the posterior mean
    starts at the prior mean and Q is optimised (and its curvature computed) on the whole
    training set — valid, since Q may depend on all of S, only P must not see the bound split;
    ``'checkpoint'``: Q starts at the trained checkpoint and sees only the bound split. The
    certificate's ``prior.data`` says which data each quantity saw.
    ``prior_kind='curvature'`` (with a prior split and the kfac posterior): the prior is
    :class:`.kron_prior.KronPrior`, N(w_p, (λ⁻¹I + τ n_p G_p ⊗ A_p)⁻¹) per layer with the K-FAC
    factors of the prior split at w_p; Q lives in the eigenbasis of those factors and starts at
    Q = P (its stds are the prior's); λ and τ are learned and rounded to their grids.
    """
    t0 = time.perf_counter()
    ckpt_info: dict[str, Any] = {}
    if isinstance(ckpt_or_model, nn.Module):
        model = ckpt_or_model
        meta: dict[str, Any] = {}
    else:
        from ..checkpoint import Checkpoint, load_checkpoint

        ckpt = ckpt_or_model if isinstance(ckpt_or_model, Checkpoint) else load_checkpoint(
            ckpt_or_model)
        model, meta = ckpt.model, dict(ckpt.meta)
        if init_model is None:
            init_model = ckpt.init_model
        ckpt_info = {"path": ckpt.path, "sha256": ckpt.sha256(), "spec": ckpt.spec}
    train_ds, test_ds, data_spec = _resolve_data(dataset, test_dataset, meta)
    if isinstance(data_spec, Mapping) and data_spec.get("standardize"):
        raise KfacboundError(
            "--standardize takes its statistics from the training split, i.e. the bound set, so "
            "the predictor would depend on the data the bound is certified on; certify without "
            "it (or standardise with fixed statistics in an npz file)"
        )
    X, y = _tensors(train_ds)
    data_spec = dict(data_spec) if isinstance(data_spec, Mapping) else {}
    data_spec["size"] = len(X)  # the training set as given, before any prior split
    # A learnt prior mean trains as the network itself (with its BatchNorm layers, in train
    # mode on the prior split) and is folded afterwards: folding first would train a network
    # without BN, and a BN study would compare two BN-free priors.
    prior_net = init_model
    bn_net = has_batchnorm(model)
    if bn_net:
        model = fold_batchnorm(model)
        if init_model is not None:
            init_model = fold_batchnorm(init_model)
    model = copy.deepcopy(model).eval()
    C = _num_outputs(model, X[:1])
    loss = loss or meta.get("loss") or default_loss(C)
    if C > 1 and loss == "bce":
        raise KfacboundError("loss 'bce' needs a one-logit network")

    prior_info: dict[str, Any] = {"split": prior_split}
    if init_model is None:
        prior_info["center"] = "zero"
    else:
        prior_info["center"] = "init"
    X_post, y_post = X, y  # the data Q is optimised on (and its curvature computed from)
    trained_model = model
    if prior_kind not in PRIOR_KINDS:
        raise KfacboundError(f"unknown prior kind {prior_kind!r}; choose from {PRIOR_KINDS}")
    if prior_kind == "curvature" and (prior_split is None or posterior != "kfac"
                                      or basis_every):
        raise KfacboundError(
            "the curvature prior needs --prior-split (its factors come from the prior split) "
            "and the kfac posterior in the prior's fixed eigenbasis (no --basis-every)")
    if prior_split is not None:
        if init_model is None:
            raise KfacboundError("--prior-split needs the initial weights w0 in the checkpoint")
        if prior_scheme not in PRIOR_SCHEMES:
            raise KfacboundError(f"unknown prior scheme {prior_scheme!r}; "
                                 f"choose from {PRIOR_SCHEMES}")
        from ..data import split_indices

        idx_p, idx_b = split_indices(len(X), prior_split, seed)
        check_disjoint(idx_p, idx_b, len(X))
        Xp, yp = X[idx_p], y[idx_p]
        X_all, y_all = X, y
        X, y = X[idx_b], y[idx_b]
        init_model = train_prior_mean(prior_net, Xp, yp, loss, epochs=prior_epochs, seed=seed,
                                      device=device, progress=progress).cpu()
        if has_batchnorm(init_model):  # eval-mode BN with the prior split's running statistics
            init_model = fold_batchnorm(init_model)
        if prior_scheme == "pbb":
            model = copy.deepcopy(init_model).eval()
            X_post, y_post = X_all, y_all
        else:
            X_post, y_post = X, y
        prior_info.update(
            center="data-dependent", prior_n=len(Xp), prior_epochs=prior_epochs,
            scheme=prior_scheme, prior_indices_sha256=_index_hash(idx_p),
            bound_indices_sha256=_index_hash(idx_b),
        )
    n = len(X)
    post_data = ("all training data (prior split + bound split)" if X_post is not X
                 else "bound split")
    prior_info["data"] = {
        "prior_mean": (f"prior split only ({prior_info['prior_n']} examples, "
                       f"{prior_epochs} epochs SGD from w0"
                       + (", trained with its BatchNorm layers, then folded" if bn_net else "")
                       + ")" if prior_split is not None
                       else "none (data-free: initial weights w0)" if init_model is not None
                       else "none (zero)"),
        "prior_variance": "grid λ_j = c·exp(−j/b), union bound over j (may use any data)",
        "posterior_mean_init": ("prior mean" if prior_split is not None and prior_scheme == "pbb"
                                else "trained checkpoint"),
        "posterior_and_curvature": post_data,
        "monte_carlo_and_n": f"bound split ({n} examples)",
    }

    factors = None
    eigenbases = None
    factors_fn = None
    curv_time = 0.0
    needs_factors = posterior == "kfac" or (posterior == "diag" and std_init == "curvature")
    if needs_factors and curvature not in CURVATURES:
        raise KfacboundError(f"unknown curvature {curvature!r}; choose from {CURVATURES}")
    if needs_factors and prior_kind != "curvature":  # (the curvature prior brings its own)
        tc = time.perf_counter()
        factors = kfac_factors(model, X_post, y_post, loss, curvature, progress=progress,
                               device=device)
        curv_time = time.perf_counter() - tc

        def factors_fn(m: nn.Module):
            return kfac_factors(m, X_post, y_post, loss, curvature, progress=False,
                                device=device)
    if posterior == "exact":
        tc = time.perf_counter()
        eigenbases = exact_eigenbases(model, X_post, y_post, loss, exact_k, progress=progress,
                                      device=device)
        curv_time = time.perf_counter() - tc

    if prior_kind == "curvature":
        # P's covariance and Q's bases: K-FAC factors of the prior split at the prior mean only
        tc = time.perf_counter()
        factors = kfac_factors(init_model, Xp, yp, loss, curvature, progress=progress,
                               device=device)
        curv_time += time.perf_counter() - tc
    torch.manual_seed(int(seed))
    Q = build_posterior(model, posterior, factors=factors, eigenbases=eigenbases,
                        std_init=std_init, std_scale=std_scale, n=n, prior_var=c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = build_prior(Q, init_model, c=c, b=b)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    if prior_kind == "curvature":
        P = curvature_prior(Q, P, n_prior=len(Xp), tau=1.0)
        prior_info.update(kind="curvature", tau_grid=list(TAU_GRID),
                          factors=f"{curvature} on the prior split at the prior mean")
    with torch.no_grad():
        kl_start = float(posterior_kl(Q, P, dtype=torch.float64))

    Xd, yd = X_post.to(device), y_post.to(device)
    to = time.perf_counter()
    log = optimize_posterior(Q, P, Xd, yd, n=n, iterations=iterations, batch_size=batch_size,
                             lr=lr, mean_lr=mean_lr, lr_decay=lr_decay, delta=delta,
                             formula=formula,
                             objective=objective, surrogate=surrogate,
                             basis_every=basis_every, factors_fn=factors_fn, device=device,
                             seed=seed, progress=progress)
    opt_time = time.perf_counter() - to
    Q.cpu()
    P.cpu()

    tm = time.perf_counter()
    cert = certify_posterior(Q, P, X, y, delta=delta, delta_prime=delta_prime,
                             mc_passes=mc_passes, formula=formula, seed=seed + 1,
                             device=device, batch_size=mc_batch_size, progress=progress,
                             selection=selection)
    mc_time = time.perf_counter() - tm
    Q.cpu()
    mean_model = Q.mean_model()
    cert["train_error"] = deterministic_error(trained_model, X, y)
    cert["train_error_posterior_mean"] = deterministic_error(mean_model, X, y)
    if test_ds is not None:
        Xt, yt = _tensors(test_ds)
        cert["test_error"] = deterministic_error(trained_model, Xt, yt)
        w, Nt = mc_errors(Q, Xt, yt, 1, mc_batch_size, seed + 2, device, False)
        cert["test_error_stochastic"] = w / Nt
        cert["test_n"] = len(Xt)
    else:
        cert["test_error"] = cert["test_error_stochastic"] = None
    cert.update(
        posterior=posterior,
        curvature=curvature if needs_factors else None,
        std_init=std_init,
        std_scale=std_scale,
        basis_every=basis_every,
        exact_k=exact_k,
        loss=loss,
        num_outputs=C,
        model_params=count_parameters(model),
        prior=prior_info,
        kl_start=kl_start,
        lambda_learned=float(P.lam.detach()),
        optimizer={"name": "RMSprop", "lr": lr, "mean_lr": mean_lr,
                   "lr_decay": list(lr_decay) if lr_decay else None, "iterations": iterations,
                   "batch_size": batch_size,
                   "objective": OBJECTIVE_TEXT[objective].format(
                       L="bounded_ce" if surrogate == "bounded-ce" else (
                           "surrogate_bits" if objective == "pinsker"
                           else "min(1, surrogate_bits)"), formula=formula),
                   "surrogate": surrogate},
        train_log={"step": log.step, "surrogate": log.surrogate, "kl": log.kl,
                   "lambda": log.lam, "bound_estimate": log.bound_estimate},
        dataset=data_spec,
        checkpoint=ckpt_info or None,
        seed=seed,
        device=str(device),
        time_s={"curvature": curv_time, "optimize": opt_time, "mc": mc_time,
                "total": time.perf_counter() - t0},
    )
    return cert


def _resolve_data(dataset: Any, test_dataset: Any, meta: Mapping[str, Any]):
    """(train, test or None, spec or None) from the forms certify_checkpoint accepts."""
    from ..data import dataset_from_spec, load_dataset

    if dataset is None:
        spec = meta.get("dataset")
        if not spec:
            raise KfacboundError("no dataset given and the checkpoint records none")
        train = dataset_from_spec(spec, "train")
        test = test_dataset if test_dataset is not None else dataset_from_spec(spec, "test")
        return train, test, getattr(train, "spec", spec)
    if isinstance(dataset, str):
        train = load_dataset(dataset, split="train")
        test = test_dataset if test_dataset is not None else load_dataset(dataset, split="test")
        return train, test, train.spec
    if isinstance(dataset, Mapping):
        spec = dict(dataset)
        train = dataset_from_spec(spec, "train")
        test = test_dataset if test_dataset is not None else dataset_from_spec(spec, "test")
        return train, test, train.spec
    return dataset, test_dataset, getattr(dataset, "spec", None)
