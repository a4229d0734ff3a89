"""PBB training objectives and the bounded cross-entropy, against values computed by hand here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from kfacbound.bounds import certify as cf
from kfacbound.bounds.optimize import (
    OBJECTIVES,
    bounded_cross_entropy,
    training_objective,
)
from kfacbound.errors import KfacboundError

from .test_certify import brentq_kl_inv, toy_data, toy_model, train

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("L,B", [(0.1, 0.02), (0.03, 0.005), (0.4, 0.3)])
def test_objectives_against_hand_computed_values(L, B):
    classic = L + math.sqrt(B / 2)
    quad = (math.sqrt(L + B / 2) + math.sqrt(B / 2)) ** 2
    # f_λ at its minimiser, found here by a brute-force grid over λ ∈ (0, 2)
    lam_grid = [i / 100000 for i in range(1, 200000)]
    flam = min(L / (1 - lam / 2) + B / (lam * (1 - lam / 2)) for lam in lam_grid)
    assert float(training_objective(T(L), T(B), "pinsker")) == pytest.approx(classic, rel=1e-12)
    assert float(training_objective(T(L), T(B), "quad")) == pytest.approx(quad, rel=1e-12)
    assert float(training_objective(T(L), T(B), "lambda")) == pytest.approx(flam, rel=1e-8)
    assert float(training_objective(T(L), T(B), "kl")) == pytest.approx(
        brentq_kl_inv(L, B), abs=1e-9)
    # the orderings the PBB paper states: kl⁻¹ ≤ f_quad and kl⁻¹ ≤ f_λ
    assert brentq_kl_inv(L, B) <= quad + 1e-12 and brentq_kl_inv(L, B) <= flam + 1e-12
    with pytest.raises(KfacboundError):
        training_objective(T(L), T(B), "nope")


def test_objective_gradients_are_finite_and_point_down():
    for obj in OBJECTIVES:
        L = T(0.1).requires_grad_()
        B = T(0.02).requires_grad_()
        training_objective(L, B, obj).backward()
        assert L.grad > 0 and B.grad > 0, obj


def test_bounded_cross_entropy_by_hand():
    p_min = 1e-5
    logits = torch.tensor([[2.0, 0.0, -1.0], [-30.0, 30.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    expect = [-math.log(p0) / math.log(1 / p_min), 1.0]  # the second p_y < p_min: clamped to 1
    got = bounded_cross_entropy(logits, y, p_min, reduction="none")
    assert got.tolist() == pytest.approx(expect, rel=1e-12)
    f = torch.tensor([1.5, -0.5], dtype=torch.float64)  # one logit: p_1 = σ(f)
    yb = torch.tensor([1, 1])
    sig = [1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(0.5))]
    got = bounded_cross_entropy(f, yb, p_min, reduction="none")
    assert got.tolist() == pytest.approx([-math.log(s) / math.log(1 / p_min) for s in sig])


@pytest.mark.parametrize("objective", ["quad", "lambda"])
def test_certificate_with_pbb_objective_and_bounded_ce(objective):
    X, y = toy_data()
    _, init, model = toy_model()
    model = train(model, X, y)
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=40,
                                 mc_passes=2, init_model=init, objective=objective,
                                 surrogate="bounded-ce", progress=False)
    cert = json.loads(json.dumps(cert))
    assert cert["optimizer"]["surrogate"] == "bounded-ce"
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    ce = cert["bounded_ce"]
    N = cert["mc_samples"]
    ub = brentq_kl_inv(ce["mc_mean"], math.log(1 / cert["delta_prime"]) / N)
    assert ce["mc_bound"] == pytest.approx(ub, abs=1e-9)
    assert ce["bound"] == pytest.approx(brentq_kl_inv(ub, cert["complexity"]), abs=1e-9)
    assert 0 <= ce["mc_mean"] <= ce["mc_bound"] <= ce["bound"] <= 1


# ------------------------------------------------------------------- optimiser and schedule


def test_lr_factor_by_hand():
    from kfacbound.bounds.optimize import lr_factor

    assert lr_factor(0, 100, "cosine") == 1.0
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(99, 100, "cosine", (0.25, 0.1)) == pytest.approx(
        (1 + math.cos(0.99 * math.pi)) / 2)  # lr_decay is not used by 'cosine'
    assert [lr_factor(s, 100, "step", (0.25, 0.1)) for s in (0, 74, 75, 99)] == [1, 1, 0.1, 0.1]
    assert lr_factor(99, 100, "step", None) == 1.0
    with pytest.raises(KfacboundError, match="schedule"):
        lr_factor(0, 10, "linear")


@pytest.mark.parametrize("optimizer,factor", [("adam", 1.0), ("rmsprop", 10.0)])
def test_first_optimiser_step_has_the_textbook_size(optimizer, factor):
    """One step from zero state moves each mean coordinate with a non-zero gradient g by
    lr·g/|g| for Adam (bias-corrected m̂/√v̂ = g/|g|) and by lr·g/√(0.01 g²) = 10·lr·sign(g) for
    RMSprop (α = 0.99): an independent check that the chosen optimiser is the one that ran."""
    from kfacbound.bounds.families import build_posterior
    from kfacbound.bounds.optimize import optimize_posterior
    from kfacbound.bounds.prior import build_prior

    X, y = toy_data(n=64)
    _, init, model = toy_model()
    Q = build_posterior(model, "diag", n=len(X))
    P = build_prior(Q, init)
    before = [p.detach().clone() for n, p in Q.named_parameters() if n.endswith(".mean")]
    mean_lr = 1e-3
    optimize_posterior(Q, P, X, y, iterations=1, batch_size=64, lr=1e-2, mean_lr=mean_lr,
                       optimizer=optimizer, schedule="cosine", train_prior=False,
                       progress=False)
    after = [p.detach() for n, p in Q.named_parameters() if n.endswith(".mean")]
    steps = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(after, before, strict=True)])
    moved = steps[steps > 0]
    assert len(moved) > 0.5 * len(steps)
    torch.testing.assert_close(moved, torch.full_like(moved, factor * mean_lr), rtol=2e-3,
                               atol=0.0)
    with pytest.raises(KfacboundError, match="optimizer"):
        optimize_posterior(Q, P, X, y, iterations=1, optimizer="sgd", progress=False)
