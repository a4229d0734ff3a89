"""Certify a PAC-Bayes bound for a checkpoint: :func:`certify` and :func:`certify_checkpoint`.

Pipeline (SCIENCE.md §5), one module per job:

1. Inputs (:mod:`.inputs`): the network, its initialisation w0 and the data; eval-mode
   BatchNorm folded into the preceding layers of both, so the bound covers exactly the deployed
   eval-mode network and the prior is centred at the folded initialisation.
2. Prior data (:mod:`.prior`): with ``prior_split=f`` a seeded fraction f of the training set
   trains the prior mean by SGD from w0 (Pérez-Ortiz et al. 2021); the bound is certified on the
   rest, n = |rest|, and the two index sets are checked to partition the training set.
3. Curvature (:mod:`.gather`): what the posterior family (:mod:`.families`) declares it needs —
   nothing, the K-FAC factors or the exact layer eigenbases.
4. Q and P: the family builds Q with its mean at the trained weights (or, with a learnt prior
   and ``prior_scheme='pbb'``, at the prior mean, optimised on the whole training set);
   P = N(w0, λI) or the curvature prior; :func:`.optimize.optimize_posterior` minimises the
   chosen objective over Q and λ (the family refreshes its basis every ``basis_every`` steps).
5. Certification (:mod:`.certificate`): λ rounded to its grid, Monte-Carlo with an independent
   network per example and pass, bound = kl⁻¹(kl⁻¹(ê_N, ln(1/δ′)/N), B), holding with
   probability ≥ 1 − δ − δ′; :func:`recompute_certificate` recomputes it from the JSON alone.

The options are a :class:`.config.CertifyConfig`. The names that lived here before the split
(the recipes, the curvature and prior helpers, the certification functions) are re-exported.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..errors import KfacboundError
from ..models import count_parameters
from ..software import versions as software_versions
from .certificate import (
    Certificate,
    certify_posterior,
    deterministic_error,
    layer_kl_terms,
    mc_draws,
    mc_errors,
    recompute_certificate,
    round_lambda,
)
from .config import (
    DEFAULT_BATCH,
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    DEFAULT_LR_DECAY,
    DEFAULT_MEAN_LR,
    DEFAULTS,
    FAST_OPTIMIZER,
    RECIPES,
    CertifyConfig,
    apply_recipe,
    expand_recipe,
)
from .families import build_posterior, posterior_family
from .gather import CURVATURES, exact_eigenbases, kfac_factors
from .inputs import resolve_inputs
from .kron_prior import posterior_kl
from .optimize import objective_text, optimize_posterior
from .pacbayes import grid_candidates
from .prior import (
    DEFAULT_PRIOR_EPOCHS,
    PRIOR_KINDS,
    PRIOR_SCHEMES,
    center_sha256,
    check_disjoint,
    curvature_prior,
    make_prior,
    prior_data,
    train_prior_mean,
)
from .select import Selection, options_jsonable, shares_prior

__all__ = [
    "CURVATURES", "DEFAULTS", "DEFAULT_BATCH", "DEFAULT_ITERATIONS", "DEFAULT_LR",
    "DEFAULT_LR_DECAY", "DEFAULT_MEAN_LR", "DEFAULT_PRIOR_EPOCHS", "FAST_OPTIMIZER",
    "PRIOR_KINDS", "PRIOR_SCHEMES", "RECIPES", "Certificate", "CertifyConfig", "apply_recipe",
    "certify", "certify_best", "certify_checkpoint", "certify_posterior", "check_disjoint",
    "curvature_prior",
    "deterministic_error", "exact_eigenbases", "expand_recipe", "grid_candidates",
    "kfac_factors", "layer_kl_terms", "mc_draws", "mc_errors", "optimize_posterior",
    "recompute_certificate", "round_lambda", "train_prior_mean",
]


def certify(model_or_ckpt: Any, data: Any = None, config: CertifyConfig | None = None, *,
            init_model: nn.Module | None = None, test_data: Any = None) -> Certificate:
    """Optimise a Gaussian posterior for a network and certify its bound (module docstring).

    ``model_or_ckpt``: a path, a :class:`kfacbound.checkpoint.Checkpoint` or an ``nn.Module``
    (then pass ``init_model`` for w0, else a zero-centred prior is used with a warning).
    ``data``: a dataset name, a spec dict (``load_dataset`` keywords with ``name``), a
    ``TensorDataset`` / (X, y) tuple, or None for the checkpoint's training data. The test split
    is loaded when the dataset is named (or pass ``test_data``); it is only reported, never
    certified on. ``config``: the options (default :data:`.config.DEFAULTS`).
    """
    return _certify(model_or_ckpt, data, config or DEFAULTS, init_model, test_data)


def _certify(model_or_ckpt: Any, data: Any, config: CertifyConfig,
             init_model: nn.Module | None, test_data: Any) -> Certificate:
    """:func:`certify`, called by it and by :func:`certify_checkpoint`: the prior's warnings are
    shown at their caller, two frames up."""
    t0 = time.perf_counter()
    family = posterior_family(config.posterior)
    inputs = resolve_inputs(model_or_ckpt, data, init_model=init_model, test_data=test_data,
                            loss=config.loss)
    pd = prior_data(inputs, config)

    source = family.needs(config.std_init)
    curvature, curv_time = None, 0.0
    refresh_fn = None
    if source is not None:
        at, Xc, yc = pd.curvature_data()
        curvature, curv_time = source(at, Xc, yc, inputs.loss, config, config.progress)
        if family.refreshes and not pd.curvature_prior:  # (the curvature prior fixes the basis)
            def refresh_fn(m: nn.Module):
                return source.gather(m, pd.X_post, pd.y_post, inputs.loss, config, False)

    torch.manual_seed(int(config.seed))
    Q = build_posterior(pd.start, family, curvature=curvature, std_init=config.std_init,
                        std_scale=config.std_scale, n=pd.n, prior_var=config.c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = make_prior(Q, pd, config)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=3)
    with torch.no_grad():
        kl_start = float(posterior_kl(Q, P, dtype=torch.float64))

    Xd, yd = pd.X_post.to(config.device), pd.y_post.to(config.device)
    to = time.perf_counter()
    log = optimize_posterior(Q, P, Xd, yd, n=pd.n, iterations=config.iterations,
                             batch_size=config.batch_size, lr=config.lr, mean_lr=config.mean_lr,
                             lr_decay=config.lr_decay, optimizer=config.optimizer,
                             schedule=config.schedule, delta=config.delta,
                             formula=config.formula, objective=config.objective,
                             surrogate=config.surrogate, basis_every=config.basis_every,
                             factors_fn=refresh_fn, device=config.device, seed=config.seed,
                             progress=config.progress)
    opt_time = time.perf_counter() - to
    Q.cpu()
    P.cpu()

    tm = time.perf_counter()
    cert = certify_posterior(Q, P, pd.X, pd.y, delta=config.delta,
                             delta_prime=config.delta_prime, mc_passes=config.mc_passes,
                             formula=config.formula, seed=config.seed + 1, device=config.device,
                             batch_size=config.mc_batch_size, progress=config.progress,
                             selection=config.selection)
    mc_time = time.perf_counter() - tm
    Q.cpu()
    cert["train_error"] = deterministic_error(inputs.model, pd.X, pd.y)
    cert["train_error_posterior_mean"] = deterministic_error(Q.mean_model(), pd.X, pd.y)
    if inputs.test is not None:
        Xt, yt = inputs.test
        cert["test_error"] = deterministic_error(inputs.model, Xt, yt)
        w, Nt = mc_errors(Q, Xt, yt, 1, config.mc_batch_size, config.seed + 2, config.device,
                          False)
        cert["test_error_stochastic"] = w / Nt
        cert["test_n"] = len(Xt)
    else:
        cert["test_error"] = cert["test_error_stochastic"] = None
    cert.update(
        posterior=family.name,
        curvature=config.curvature if source is not None and source.records_flavour else None,
        std_init=config.std_init,
        std_scale=config.std_scale,
        basis_every=config.basis_every,
        exact_k=config.exact_k,
        loss=inputs.loss,
        num_outputs=inputs.num_outputs,
        model_params=count_parameters(pd.start),
        prior=dict(pd.record, center_sha256=center_sha256(P)),
        software=software_versions(),
        kl_start=kl_start,
        lambda_learned=float(P.lam.detach()),
        optimizer={"name": {"rmsprop": "RMSprop", "adam": "Adam"}[config.optimizer],
                   "lr": config.lr, "mean_lr": config.mean_lr, "schedule": config.schedule,
                   "lr_decay": (list(config.lr_decay) if config.lr_decay
                                and config.schedule == "step" else None),
                   "iterations": config.iterations, "batch_size": config.batch_size,
                   "objective": objective_text(config.objective, config.surrogate,
                                               config.formula),
                   "surrogate": config.surrogate},
        train_log={"step": log.step, "surrogate": log.surrogate, "kl": log.kl,
                   "lambda": log.lam, "bound_estimate": log.bound_estimate},
        dataset=inputs.data_spec,
        checkpoint=inputs.checkpoint,
        seed=config.seed,
        device=str(config.device),
        time_s={"curvature": curv_time, "optimize": opt_time, "mc": mc_time,
                "total": time.perf_counter() - t0},
    )
    return Certificate(Q, P, cert, config)


#: certify_checkpoint's options that may also be given by position (after ckpt_or_model, dataset).
_POSITIONAL = ("posterior", "curvature", "iterations", "delta", "delta_prime", "mc_passes",
               "prior_split", "device", "seed", "progress")


def _checkpoint_signature() -> inspect.Signature:
    """``(ckpt_or_model, dataset=None, <_POSITIONAL>, *, init_model=None, test_dataset=None,
    <the other fields>)``, each option with :class:`CertifyConfig`'s default and annotation."""
    P = inspect.Parameter
    hint = {f.name: f.type for f in fields(CertifyConfig)}

    def option(name: str, kind: inspect._ParameterKind) -> inspect.Parameter:
        return P(name, kind, default=getattr(DEFAULTS, name), annotation=hint[name])

    return inspect.Signature(
        [P("ckpt_or_model", P.POSITIONAL_OR_KEYWORD, annotation="Any"),
         P("dataset", P.POSITIONAL_OR_KEYWORD, default=None, annotation="Any")]
        + [option(name, P.POSITIONAL_OR_KEYWORD) for name in _POSITIONAL]
        + [P("init_model", P.KEYWORD_ONLY, default=None, annotation="nn.Module | None"),
           P("test_dataset", P.KEYWORD_ONLY, default=None, annotation="Any")]
        + [option(name, P.KEYWORD_ONLY) for name in hint if name not in _POSITIONAL],
        return_annotation="dict[str, Any]")


def certify_checkpoint(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`certify` with the options as keywords; returns the JSON-able certificate.

    Signature: ``certify_checkpoint(ckpt_or_model, dataset=None, posterior, curvature,
    iterations, delta, delta_prime, mc_passes, prior_split, device, seed, progress, *,
    init_model=None, test_dataset=None, <every other field of CertifyConfig>)``, the options with
    :class:`CertifyConfig`'s defaults (the signature is built from the config, so the two cannot
    drift apart). ``test_dataset`` is :func:`certify`'s ``test_data``. Batch jobs take their
    options and defaults from this signature (their keys hash them).
    """
    options = certify_checkpoint.__signature__.bind(*args, **kwargs).arguments
    target, data = options.pop("ckpt_or_model"), options.pop("dataset", None)
    init, test = options.pop("init_model", None), options.pop("test_dataset", None)
    return _certify(target, data, CertifyConfig(**options), init, test).to_json()


certify_checkpoint.__signature__ = _checkpoint_signature()  # type: ignore[attr-defined]


def certify_best(ckpt: Any, dataset: Any = None, candidates: Sequence[Mapping[str, Any]] = (),
                 **common: Any) -> dict[str, Any]:
    """Certify every candidate (``certify_checkpoint(ckpt, dataset, **common, **candidate)``) under
    a union bound over all of them and return the certificate with the smallest bound.

    The returned certificate's ``selection`` lists every candidate (its options, bound and KL) and
    the index ``chosen``; each candidate was certified at the budgets of :class:`Selection`, so
    the minimum holds with probability ≥ 1 − δ − δ′.
    """
    candidates = [dict(c) for c in candidates]
    if not candidates:
        raise KfacboundError("certify_best needs at least one candidate")
    if "selection" in common:
        raise KfacboundError("certify_best sets the selection itself")
    if any(k in c for c in candidates for k in ("delta", "delta_prime")):
        raise KfacboundError("δ and δ′ are the selection's total budget: give them once, not "
                             "per candidate")
    sel = Selection(m=len(candidates), shared_prior=shares_prior(common, candidates))
    certs = [certify_checkpoint(ckpt, dataset, **{**common, **cand}, selection=sel)
             for cand in candidates]
    chosen = min(range(len(certs)), key=lambda i: certs[i]["bound"])
    best = certs[chosen]
    best["selection"]["chosen"] = chosen
    best["selection"]["candidates"] = [
        {"options": options_jsonable(cand), "bound": c["bound"], "kl": c["kl"],
         "mc_error": c["mc_error"]}
        for cand, c in zip(candidates, certs, strict=True)
    ]
    return best
