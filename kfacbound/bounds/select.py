"""Choosing among several certified runs without losing validity: a union bound over candidates.

Certifying m candidate posteriors Q_1 … Q_m (other posterior families, schedules, priors) and
reporting the smallest bound is a data-dependent choice. The two probabilistic steps of a
certificate (SCIENCE.md §5) behave differently under it:

- **PAC-Bayes step** (kl(L̂(Q)‖L(Q)) ≤ B): for one prior P and one bound set it holds for *all* Q
  simultaneously with probability 1 − δ, so choosing among posteriors that share P costs nothing.
  Candidates with different priors (a data-dependent prior trained per candidate, another λ grid,
  another bound split) each need their own event: δ/m each.
- **Monte-Carlo step** (L̂(Q) ≤ kl⁻¹(ê_N, ln(1/δ′)/N)) holds for one *fixed* Q. Picking the
  candidate with the best certified value looks at the certification draws, so each candidate's
  MC bound is taken at δ′/m.

By the union bound, with probability ≥ 1 − δ − δ′ every candidate's bound holds at once, so the
minimum is a valid certificate at confidence 1 − δ − δ′. The cost is small: ln m / N in the MC
term and, without a shared prior, ln m / n in B (m = 3, n = 60,000: 1.8e-5).

A certificate made this way carries ``selection = {m, rule, shared_prior, delta_each,
delta_prime_each, …}``; :func:`kfacbound.bounds.certificate.recompute_certificate` recomputes it
with those budgets and checks that they follow from (δ, δ′, m, shared_prior).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import KfacboundError

SELECTION_RULES = ("union",)


@dataclass(frozen=True)
class Selection:
    """A union bound over ``m`` candidates; ``shared_prior``: all use the same P and bound set."""

    m: int
    shared_prior: bool
    rule: str = "union"

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise KfacboundError(f"a selection needs an integer number of candidates ≥ 1, "
                                 f"not {self.m!r}")
        if self.rule not in SELECTION_RULES:
            raise KfacboundError(f"unknown selection rule {self.rule!r}; "
                                 f"choose from {SELECTION_RULES}")

    def budgets(self, delta: float, delta_prime: float) -> tuple[float, float]:
        """(δ per candidate, δ′ per candidate): (δ or δ/m, δ′/m)."""
        return (delta if self.shared_prior else delta / self.m), delta_prime / self.m

    def to_json(self, delta: float, delta_prime: float) -> dict[str, Any]:
        d_each, dp_each = self.budgets(delta, delta_prime)
        return {"m": self.m, "rule": self.rule, "shared_prior": self.shared_prior,
                "delta_each": d_each, "delta_prime_each": dp_each}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Selection:
        m = d.get("m")
        if isinstance(m, float) and m.is_integer():
            m = int(m)
        return cls(m=m, shared_prior=bool(d["shared_prior"]), rule=d.get("rule", "union"))


#: Options of certify_checkpoint that change the prior P or the bound set: candidates that differ
#: in one of them (or use a data-dependent prior at all) do not share a prior.
PRIOR_KEYS = ("prior_split", "prior_epochs", "prior_dropout", "prior_scheme", "prior_kind", "c",
              "b", "init_model", "dataset",
              "formula")  # another formula is another PAC-Bayes inequality (event)


def shares_prior(common: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> bool:
    """True when every candidate is certified against the same data-free prior on the same set.

    Conservative: a data-dependent prior (``prior_split``) is trained once per candidate, so
    candidates with one are never treated as sharing it.
    """
    for cand in candidates:
        if any(key in cand for key in PRIOR_KEYS):
            return False
        if cand.get("prior_split", common.get("prior_split")) is not None:
            return False
    return True


def options_jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v))
            for k, v in options.items()}
