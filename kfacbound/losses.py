"""Loss functions, targets and the 0-1 error, named as in the papers.

Three losses are supported, each with ``reduction='mean'`` over the examples of a batch:

- ``"ce"``: cross-entropy on C logits. Per-example Hessian w.r.t. the logits
  Λ = diag(p) − p pᵀ (rank C − 1).
- ``"bce"``: binary logistic loss on one logit (Dziugaite & Roy's networks), targets in {0, 1};
  Λ = σ(f)(1 − σ(f)).
- ``"mse"``: torch's ``MSELoss(reduction='mean')`` = (1/(N·C)) Σ (f − y)², targets one-hot for
  classification data (or the raw value when C = 1). Λ = (2/C)·I per example.

The 0-1 error of a one-logit network thresholds the logit at 0; otherwise it is the arg-max.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import KfacboundError

LOSSES = ("ce", "bce", "mse")


def default_loss(num_outputs: int) -> str:
    """The natural loss for a classifier with ``num_outputs`` logits."""
    return "bce" if num_outputs == 1 else "ce"


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise KfacboundError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return name


def make_loss(name: str, reduction: str = "mean") -> nn.Module:
    """The torch loss module for ``name`` (see the module docstring for conventions)."""
    check_loss(name)
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    if name == "bce":
        return nn.BCEWithLogitsLoss(reduction=reduction)
    return nn.MSELoss(reduction=reduction)


def prepare_targets(name: str, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Integer labels ``y`` turned into the target tensor ``make_loss(name)`` expects."""
    check_loss(name)
    if name == "ce":
        if num_outputs < 2:
            raise KfacboundError("cross-entropy needs at least 2 outputs; use loss 'bce'")
        return y.long()
    if name == "bce":
        if num_outputs != 1:
            raise KfacboundError(
                f"the binary logistic loss needs one output logit, the model has {num_outputs}"
            )
        return y.to(torch.get_default_dtype()).reshape(-1, 1)
    if num_outputs == 1:
        return y.to(torch.get_default_dtype()).reshape(-1, 1)
    return torch.nn.functional.one_hot(y.long(), num_outputs).to(torch.get_default_dtype())


def zero_one_errors(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example 0-1 loss (a bool tensor) of ``logits`` [N, C] against integer labels ``y``.

    An example with a non-finite logit (NaN or ±inf, e.g. from a diverged posterior sample)
    counts as an error: argmax would pick the NaN's index and a NaN one-logit output would read
    as class 0, both possibly "correct", which would make a certified error too small."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        flat = logits.reshape(-1)
        pred, bad = (flat > 0).long(), ~torch.isfinite(flat)
    else:
        pred, bad = logits.argmax(dim=-1), ~torch.isfinite(logits).all(dim=-1)
    return (pred != y.reshape(-1).long()) | bad
