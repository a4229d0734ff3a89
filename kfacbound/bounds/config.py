"""All options of a certificate in one place: :class:`CertifyConfig`, its defaults and recipes.

The defaults are Dziugaite & Roy's (2017) recipe — the diagonal posterior, RMSprop for 20,000
steps of batch 100 at lr 10⁻³ (means, stds and λ alike), δ = 0.025, δ′ = 0.01, the λ grid
c·exp(−j/b) with c = 0.1, b = 100 — plus a step decay of the learning rates (×0.1 for the last
quarter of the steps; not in their recipe: measured on binary Fashion-MNIST T-600, 20k steps,
K-FAC posterior, 0.1716 without, 0.1580 with, results/bounds) and the Maurer (Langford–Seeger)
form of the bound, (KL + ln(2√n/δ))/n. The bound holds with probability ≥ 1 − δ − δ′.

Recipes (:data:`RECIPES`) are named sets of options; :func:`apply_recipe` fills every option the
user did not give explicitly. ``kfacbound bound`` applies the recipe ``default`` (a learnt prior,
Q started at Q = P, 500 steps) unless ``--recipe`` says otherwise; ``CertifyConfig()`` itself is
the recipe ``dr`` (the defaults above), so that the Python API and batch specs that spell out
their options keep their meaning and their job keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..errors import KfacboundError
from ..losses import check_loss
from .families import posterior_family
from .gather import CURVATURES
from .optimize import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS, SURROGATES, lr_decay_step
from .pacbayes import FORMULAS, GRID_B, GRID_C
from .posteriors import STD_INITS
from .prior import DEFAULT_PRIOR_DROPOUT, DEFAULT_PRIOR_EPOCHS, check_prior_options
from .select import Selection

# CertifyConfig's optimiser defaults (the recipe "dr"): Dziugaite & Roy's RMSprop, 20,000 steps
# of batch 100 at lr 1e-3 (means, stds and λ alike). "fast" (RECIPES) is 3.4× faster end to end
# but 0.004 looser on binary Fashion-MNIST T-600; the command's default recipe "default" (learnt
# prior, Q = P start, 500 steps) is 6.3× faster than "dr" and 2.2× tighter there
# (benchmarks/RESULTS.md, "Certificate time").
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
DEFAULT_OPTIMIZER = "rmsprop"
DEFAULT_SCHEDULE = "step"

#: Command-line flags of the options whose flag is not ``--`` + the name with dashes.
_FLAGS = {"c": "--grid-c", "b": "--grid-b", "prior_kind": "--prior"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class CertifyConfig:
    """The options of one certificate (:func:`kfacbound.bounds.certify.certify`).

    The field names are those of :func:`~kfacbound.bounds.certify.certify_checkpoint`'s keywords
    (and of the ``kfacbound bound`` options). Posterior and curvature: ``posterior`` (a family of
    :mod:`.families`), ``curvature`` (K-FAC flavour, for families built from K-FAC factors),
    ``std_init`` ('dr', 'curvature' or a positive number, also given as a string),
    ``std_scale``, ``basis_every`` (refresh the family's basis every that many steps),
    ``exact_k`` (top-k exact eigenvectors per layer). Optimiser: ``iterations``, ``lr``,
    ``mean_lr`` (None: ``lr``), ``optimizer`` ('rmsprop', 'adam'), ``schedule`` ('step':
    ``lr_decay=(f, γ)``, rates × γ for the last fraction f of the steps, None or f = 0:
    constant, D&R's schedule; 'cosine': rates × ½(1 + cos(π t/T))), ``batch_size``, ``objective``,
    ``surrogate``. Certificate: ``delta``, ``delta_prime``, ``formula``, ``mc_passes``,
    ``mc_batch_size``, the λ grid ``c``, ``b``, ``selection`` (this run is one candidate of a
    selection, :mod:`.select`). Prior (:mod:`.prior`): ``prior_split``, ``prior_epochs``,
    ``prior_dropout``,
    ``prior_scheme``, ``prior_kind``. Run: ``loss`` (None: the checkpoint's or the natural one),
    ``device``, ``seed``, ``progress``.

    Bad values raise :class:`KfacboundError` at construction, naming the command-line flag.
    """

    posterior: str = "diag"
    curvature: str = "kflr"
    iterations: int = DEFAULT_ITERATIONS
    delta: float = 0.025
    delta_prime: float = 0.01
    mc_passes: int = 10
    prior_split: float | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    loss: str | None = None
    formula: str = "maurer"
    objective: str = "pinsker"
    surrogate: str = "bits"
    lr: float = DEFAULT_LR
    mean_lr: float | None = DEFAULT_MEAN_LR
    lr_decay: tuple[float, float] | None = DEFAULT_LR_DECAY
    optimizer: str = DEFAULT_OPTIMIZER
    schedule: str = DEFAULT_SCHEDULE
    batch_size: int = DEFAULT_BATCH
    std_init: str | float = "dr"
    std_scale: float = 1.0
    basis_every: int | None = None
    exact_k: int | None = None
    prior_epochs: int = DEFAULT_PRIOR_EPOCHS
    prior_dropout: float = DEFAULT_PRIOR_DROPOUT
    prior_scheme: str = "pbb"
    prior_kind: str = "isotropic"
    c: float = GRID_C
    b: float = GRID_B
    mc_batch_size: int = 8192
    selection: Selection | None = None

    def __post_init__(self) -> None:
        for name in ("delta", "delta_prime"):
            _check_prob(name, getattr(self, name))
        if self.delta + self.delta_prime >= 1:
            raise KfacboundError("--delta + --delta-prime must be below 1")
        for name, least in (("iterations", 0), ("mc_passes", 1), ("batch_size", 1),
                            ("mc_batch_size", 1), ("prior_epochs", 0)):
            _check_int(name, getattr(self, name), least)
        for name in ("basis_every", "exact_k"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.prior_split is not None:
            _check_prob("prior_split", self.prior_split)
        if (isinstance(self.prior_dropout, bool) or not isinstance(self.prior_dropout, int | float)
                or not 0.0 <= self.prior_dropout < 1.0):
            raise KfacboundError(f"--prior-dropout must lie in [0, 1), not {self.prior_dropout!r}")
        object.__setattr__(self, "std_init", _std_init(self.std_init))
        for name in ("lr", "mean_lr", "std_scale", "c", "b"):
            if getattr(self, name) is not None or name != "mean_lr":
                _check_positive(name, getattr(self, name))
        lr_decay_step(self.lr_decay, self.iterations)
        if not isinstance(self.posterior, str):
            raise KfacboundError(f"posterior must be the name of a registered family, not "
                                 f"{self.posterior!r}")
        posterior_family(self.posterior)
        _check_choice("curvature", self.curvature, CURVATURES)
        _check_choice("formula", self.formula, FORMULAS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("surrogate", self.surrogate, SURROGATES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, LR_SCHEDULES)
        if self.loss is not None:
            check_loss(self.loss)
        check_prior_options(self)
        if self.selection is not None and not isinstance(self.selection, Selection):
            raise KfacboundError(f"selection must be a Selection, not {self.selection!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **changes: Any) -> CertifyConfig:
        """The config with the entries of ``options`` (and ``changes``) whose keys are field
        names; other keys are ignored (e.g. the CLI's ``output``)."""
        given = {**options, **changes}
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})

    def options(self) -> dict[str, Any]:
        """{field: value}: the keywords of :func:`.certify.certify_checkpoint` for this config."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> CertifyConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_prob(name: str, v: float) -> None:
    if not 0.0 < v < 1.0:
        raise KfacboundError(f"{_flag(name)} must lie in (0, 1), got {v}")


def _check_int(name: str, v: Any, least: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KfacboundError(f"{_flag(name)} must be an integer, not {v!r}")
    if v < least:
        raise KfacboundError(f"{_flag(name)} is too small: {v}")


def _check_positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
        raise KfacboundError(f"{_flag(name)} must be a positive number, not {v!r}")


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise KfacboundError(f"unknown {name} {v!r}; choose from {', '.join(choices)}")


def _std_init(value: str | float) -> str | float:
    """'dr', 'curvature' or a positive number (a numeric string is converted)."""
    if isinstance(value, str) and value in STD_INITS:
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise KfacboundError(
            f"--std-init must be 'dr', 'curvature' or a number, not {value!r}"
        ) from None
    if not v > 0:
        raise KfacboundError("--std-init must be positive")
    return value if isinstance(value, int | float) and not isinstance(value, bool) else v


#: The defaults of every option (:func:`.certify.certify_checkpoint`'s signature reads them).
DEFAULTS = CertifyConfig()


# ----------------------------------------------------------------------------- recipes

#: Initial std of every weight in the learnt-prior recipes ("default", "best"): with Q starting
#: at the prior mean (PBB scheme) and λ at its KL-optimal start, λ = σ₀², Q starts equal to P
#: (KL = 0), as in Pérez-Ortiz et al. (2021). Measured (benchmarks/RESULTS.md, "Certificate
#: time", tuning seed 100): on binary Fashion-MNIST T-600 at 250 steps 0.001 / 0.002 / 0.005 /
#: 0.01 / 0.02 / 0.03 gave 0.0839 / 0.0741 / 0.0755 / 0.1024 / 0.1434 / 0.1854 ('dr', |w|: 0.3529);
#: on 10-class Fashion-MNIST MLP-600 and LeNet-5, with and without BN, 0.002 beat 0.005 on all
#: four networks.
LEARNT_STD_INIT = 0.002
#: Optimiser steps of the learnt-prior recipes (batch 500, the fast learning rates): from Q = P,
#: 500 steps certified 0.0715 on binary Fashion-MNIST T-600 (KL 14), 250 steps 0.0741, 100 steps
#: 0.2358 (the means move before λ and the stds have followed: KL 3119).
LEARNT_ITERATIONS = 500
#: The options of the learnt-prior recipes ("default"; "best" adds the posterior selection).
LEARNT_RECIPE: dict[str, Any] = {
    "prior_split": 0.5, "prior_scheme": "pbb", "prior_epochs": DEFAULT_PRIOR_EPOCHS,
    "prior_dropout": DEFAULT_PRIOR_DROPOUT, "prior_kind": "isotropic", "objective": "pinsker",
    **FAST_OPTIMIZER, "iterations": LEARNT_ITERATIONS, "std_init": LEARNT_STD_INIT}

#: Named settings of a certificate.
#:
#: - "default" (what ``kfacbound bound`` uses): a learnt prior — the prior mean trained on half
#:   the training set (PBB scheme, :data:`.prior.DEFAULT_PRIOR_EPOCHS` = 30 SGD epochs with
#:   dropout 0.2), the bound certified on the other half — and the diagonal posterior started at
#:   Q = P (:data:`LEARNT_STD_INIT`) for :data:`LEARNT_ITERATIONS` steps of the fast optimiser
#:   settings. On binary Fashion-MNIST T-600 it certified 0.0717 against 0.1739 for "dr" (diag;
#:   0.1575 with K-FAC), 6.3× faster end to end (benchmarks/RESULTS.md, "Certificate time").
#: - "dr": Dziugaite & Roy (2017) — the data-free prior N(w0, λI), Q started at |w|, 20,000
#:   RMSprop steps of batch 100 (:class:`CertifyConfig`'s defaults).
#: - "fast": "dr" with :data:`FAST_OPTIMIZER` (2,000 × 500).
#: - "best": "default" with both the diagonal and the K-FAC posterior certified
#:   (:data:`RECIPE_POSTERIORS`) and the tighter kept under a union bound over the two.
#:
#: Until 2026-12-07 "best" was the learnt prior with Q started at |w| ('dr' std init) and 4,000
#: steps (0.0947 on binary Fashion-MNIST T-600, 0.1433 on 10-class), and the command's default
#: was "dr"; results/bn_study spells those options out in its spec.
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(LEARNT_RECIPE),
    "dr": {},
    "fast": dict(FAST_OPTIMIZER),
    "best": dict(LEARNT_RECIPE),
}
#: Recipes that certify several posterior families when no posterior is given explicitly and
#: keep the tightest certificate, under a union bound over them (each candidate at δ/m, δ′/m:
#: :func:`.certify.certify_best`, :class:`.select.Selection`).
RECIPE_POSTERIORS: dict[str, tuple[str, ...]] = {"best": ("diag", "kfac")}


def recipe_posteriors(name: str, explicit: set[str] | frozenset = frozenset()
                      ) -> tuple[str, ...] | None:
    """The posterior families recipe ``name`` selects among, or None (one posterior: the
    given or default one), e.g. when ``posterior`` is in ``explicit``."""
    return None if "posterior" in explicit else RECIPE_POSTERIORS.get(name)


O = TypeVar("O", CertifyConfig, Mapping[str, Any])


def apply_recipe(name: str, options: O, explicit: set[str] | frozenset = frozenset()
                 ) -> tuple[O, dict[str, Any]]:
    """(options with the recipe's values, what the recipe set): the recipe fills every option
    that is not in ``explicit`` (the ones the user gave). ``options``: a :class:`CertifyConfig`
    (a new, validated config is returned) or a mapping of options (a new dict)."""
    if name not in RECIPES:
        raise KfacboundError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    chosen = {k: v for k, v in RECIPES[name].items() if k not in explicit}
    if isinstance(options, CertifyConfig):
        return options.replace(**chosen), chosen
    return {**options, **chosen}, chosen


def expand_recipe(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with a ``recipe`` entry replaced by the recipe's settings (options given
    beside it win): what a batch spec's ``recipe = "best"`` means. A recipe that selects among
    posteriors (:data:`RECIPE_POSTERIORS`) sets ``posterior`` to the list of them when none is
    given; the batch's bound job then certifies them under a union bound."""
    options = dict(options)
    name = options.pop("recipe", None)
    if name is None:
        return options
    out = apply_recipe(str(name), options, explicit=set(options))[0]
    several = recipe_posteriors(str(name), set(options))
    if several:
        out["posterior"] = list(several)
    return out
