"""`kfacbound bound CKPT`: certify a PAC-Bayes bound for a checkpoint and write the JSON.

Thin layer over :func:`kfacbound.bounds.certify.certify`: every option but ``--recipe`` and
``-o`` is the field of :class:`kfacbound.bounds.config.CertifyConfig` of the same name.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from ..bounds.certify import certify, certify_best
from ..bounds.config import (
    DEFAULT_BATCH,
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    DEFAULT_LR_DECAY,
    DEFAULT_MEAN_LR,
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULE,
    RECIPES,
    CertifyConfig,
    apply_recipe,
    recipe_posteriors,
)
from ..bounds.families import family_help, family_names
from ..bounds.gather import CURVATURES
from ..bounds.optimize import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS, SURROGATES
from ..bounds.pacbayes import FORMULAS, GRID_B, GRID_C
from ..bounds.prior import DEFAULT_PRIOR_DROPOUT, DEFAULT_PRIOR_EPOCHS, PRIOR_KINDS, PRIOR_SCHEMES
from ..errors import KfacboundError
from .common import (
    dataset_from_options,
    dataset_options,
    device_option,
    open_checkpoint,
    progress_option,
    with_dataset,
    write_json,
)


@click.command("bound")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@dataset_options(required=False)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="default", show_default=True,
              help="default: a learnt prior (the prior mean trained on half the data, 30 epochs "
                   "with dropout 0.2, PBB scheme; the bound on the other half) and the diagonal "
                   "posterior started at Q = P (std 0.002), 500 steps of batch 500; dr: Dziugaite "
                   "& Roy's data-free prior at w0, 20,000 steps of batch 100 (the defaults shown "
                   "below); fast: dr at 2,000 steps of batch 500; best: default with the "
                   "diagonal and the K-FAC posterior both certified and the tighter kept, under a "
                   "union bound, unless --posterior is given. Options given explicitly override "
                   "the recipe; the output says what it chose.")
@click.option("--posterior", type=click.Choice(family_names()), multiple=True,
              default=("diag",), show_default=True,
              help=f"{family_help()}. Repeat it to certify each and keep the tightest, under a "
                   "union bound over the candidates (δ′/m each; the prior is shared).")
@click.option("--curvature", type=click.Choice(CURVATURES), default="kflr", show_default=True,
              help="K-FAC flavour for the kfac posterior (exact Λ or MC-sampled).")
@click.option("--iterations", type=int, default=DEFAULT_ITERATIONS, show_default=True,
              help="RMSprop steps on the Dziugaite & Roy objective (the defaults shown are the "
                   "dr recipe's; --recipe default sets 500).")
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True,
              help="RMSprop learning rate (stds, λ; and means unless --mean-lr).")
@click.option("--mean-lr", type=float, default=DEFAULT_MEAN_LR,
              help="Learning rate of the means (default: the same as --lr).")
@click.option("--lr-decay", type=(float, float), default=DEFAULT_LR_DECAY, show_default=True,
              metavar="FRAC FACTOR",
              help="Multiply all learning rates by FACTOR for the last FRAC of the steps; "
                   "'0 1' keeps them constant (Dziugaite & Roy).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULT_OPTIMIZER,
              show_default=True, help="rmsprop (Dziugaite & Roy) or adam.")
@click.option("--schedule", type=click.Choice(LR_SCHEDULES), default=DEFAULT_SCHEDULE,
              show_default=True,
              help="step: --lr-decay; cosine: rates × ½(1 + cos(π t/T)) (--lr-decay unused).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="pinsker", show_default=True,
              help="pinsker: surrogate + √(B/2) (Dziugaite & Roy; PBB's f_classic); quad: "
                   "PBB's f_quad; lambda: f_λ (Thiemann et al.); kl: kl⁻¹(surrogate, B).")
@click.option("--surrogate", type=click.Choice(SURROGATES), default="bits", show_default=True,
              help="bits: logistic/cross-entropy ÷ ln 2 (≥ the 0-1 loss); bounded-ce: PBB's "
                   "cross-entropy with p ≥ p_min, scaled into [0, 1].")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH, show_default=True)
@click.option("--std-init", default="dr", show_default=True,
              help="'dr' (|w| in the posterior basis), 'curvature' (Laplace-like) or a number.")
@click.option("--std-scale", type=float, default=1.0, show_default=True,
              help="Factor on the 'dr' std initialisation.")
@click.option("--basis-every", type=int, default=None,
              help="kfac: recompute the eigenbasis at the current mean every K steps.")
@click.option("--exact-k", type=int, default=None,
              help="exact: keep the top-k eigenvectors per layer (default all).")
@click.option("--formula", type=click.Choice(FORMULAS), default="maurer", show_default=True,
              help="Complexity term: maurer (KL+ln(2√n/δ))/n or dr (KL+ln(n/δ))/(n−1).")
@click.option("--delta", type=float, default=0.025, show_default=True)
@click.option("--delta-prime", type=float, default=0.01, show_default=True)
@click.option("--mc-passes", type=int, default=10, show_default=True,
              help="Passes over the bound set, one posterior sample per example each.")
@click.option("--prior-split", type=float, default=None,
              help="Train the prior mean on this fraction of the training data; certify on the "
              "rest.")
@click.option("--prior-epochs", type=int, default=DEFAULT_PRIOR_EPOCHS, show_default=True,
              help="SGD epochs of the prior mean on the prior split.")
@click.option("--prior-dropout", type=float, default=DEFAULT_PRIOR_DROPOUT, show_default=True,
              help="Dropout rate on the inputs of every layer after the first while the prior "
                   "mean trains (PBB's 0.2); the prior itself has no dropout; 0: none.")
@click.option("--prior-scheme", type=click.Choice(PRIOR_SCHEMES), default="pbb",
              show_default=True,
              help="pbb: Q starts at the prior mean and trains on all data (Pérez-Ortiz et al.); "
                   "checkpoint: Q starts at the checkpoint and trains on the bound split.")
@click.option("--prior", "prior_kind", type=click.Choice(PRIOR_KINDS), default="isotropic",
              show_default=True,
              help="isotropic: N(w_p, λI); curvature: N(w_p, (λ⁻¹I + τ n_p G⊗A)⁻¹) from the "
                   "prior split's K-FAC factors (needs --prior-split and --posterior kfac).")
@click.option("--grid-c", "c", type=float, default=GRID_C, show_default=True)
@click.option("--grid-b", "b", type=float, default=GRID_B, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@progress_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the certificate JSON here.")
@with_dataset
def command(checkpoint: str, data_opts: dict[str, Any], **kw: Any) -> None:
    """Certify a PAC-Bayes bound for CHECKPOINT (holds with probability ≥ 1 − δ − δ′)."""
    ctx = click.get_current_context()
    explicit = {k for k in kw if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    options, chosen = apply_recipe(kw["recipe"], kw, explicit)
    several = recipe_posteriors(kw["recipe"], explicit)
    if several:
        chosen["posterior"] = f"the tighter of {', '.join(several)} (union bound)"
    posteriors = list(several or dict.fromkeys(kw["posterior"]))
    configs = [CertifyConfig.from_options(options, posterior=p) for p in posteriors]
    ckpt = open_checkpoint(checkpoint)
    train = dataset_from_options(data_opts, "train", ckpt)
    try:
        test = dataset_from_options(data_opts, "test", ckpt)
    except KfacboundError:
        test = None
    if len(configs) == 1:
        cert = certify(ckpt, train, configs[0], test_data=test).to_json()
    else:
        common = {k: v for k, v in configs[0].options().items()
                  if k not in ("posterior", "selection")}
        cert = certify_best(ckpt, train, [{"posterior": p} for p in posteriors],
                            test_dataset=test, **common)
    cert["recipe"] = {"name": kw["recipe"], "chosen": chosen}
    if kw["output"]:
        write_json(kw["output"], cert)
    if chosen:
        click.echo(f"recipe {kw['recipe']}: " + ", ".join(f"{k}={v}" for k, v in chosen.items())
                   + " (options you gave are kept)")
    click.echo(summary(cert))
    if kw["output"]:
        click.echo(f"certificate written to {kw['output']}")


def summary(cert: dict[str, Any]) -> str:
    """A readable multi-line summary of a certificate."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"PAC-Bayes bound ({cert['posterior']} posterior, {cert['formula']} form): "
        f"{cert['bound']:.4f}  (confidence {cert['confidence']:.3f})",
        f"  n = {cert['n']}, δ = {cert['delta']}, δ′ = {cert['delta_prime']}, "
        f"prior centre: {cert['prior']['center']}",
        f"  KL = {cert['kl']:.1f} nats, j = {cert['j']}, λ = {cert['lambda']:.4e}",
        f"  stochastic train error ê_N = {cert['mc_error']:.4f} over N = {cert['mc_samples']}"
        f" draws, upper bound {cert['mc_error_bound']:.4f}",
        f"  deterministic train/test error: {fmt(cert['train_error'])} / "
        f"{fmt(cert['test_error'])}; stochastic test error: {fmt(cert['test_error_stochastic'])}",
        "  other formulas: " + ", ".join(f"{k} {v:.4f}" for k, v in cert["bounds"].items()),
    ]
    if cert.get("bounded_ce"):
        ce = cert["bounded_ce"]
        lines.append(f"  bounded cross-entropy (p_min {ce['p_min']:g}): ê_N = {ce['mc_mean']:.4f}, "
                     f"certified {ce['bound']:.4f} (a separate statement)")
    sel = cert.get("selection")
    if sel:
        cands = ", ".join(f"{c['options']} {c['bound']:.4f}" for c in sel.get("candidates", []))
        lines.append(f"  chosen among m = {sel['m']} candidates ({cands}) under a union bound: "
                     f"δ per candidate {sel['delta_each']:.4g}, δ′ {sel['delta_prime_each']:.4g}")
    return "\n".join(lines)
