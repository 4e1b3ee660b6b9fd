"""The update rule: what an adapter's trained vector v over the selected directions S means.

Every rule gives W' = U diag(σ + δ) Vᵀ (δ = 0 outside S), computed in the one-sided form with the
per-direction scales g = δ / σ (functional.py):

    rule             v holds   δ          g         small σ left out
    additive         δ         v          v / σ     yes: σ ≈ 0 makes g = δ/σ blow up (SigmaConfig.sigma_tol)
    multiplicative   g         σ ⊙ v      v         no

This table is the only place that knows the rules apart. SigmaConfig(update=...) accepts its names,
and everything that turns a trained vector into numbers (the layer's forward, the bank's rows, the
merged weight, `sigmatune inspect`) asks update_rule(name). A new rule is one more UpdateRule here.
(An adapter *structure* — what the trained object is, a vector or a band — is a separate choice.)
"""

from __future__ import annotations

import torch


class UpdateRule:
    """One row of the table: how δ and g follow from the trained vector and σ_S. Subclasses set the
    name and say whether small σ must be left out; instances are stateless (UPDATES holds one each)."""

    name: str
    drops_small_sigma: bool  # directions with σ < sigma_tol · σ_max are left out of S

    def scales(self, vector: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """g = δ / σ over S (r,): the one-sided scales, the relative change of each singular value."""
        raise NotImplementedError

    def deltas(self, vector: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """δ over S (r,): the change of the selected singular values, σ_S → σ_S + δ."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"UpdateRule({self.name!r})"


class Additive(UpdateRule):
    """v = δ, as in the seed package: g = δ / σ."""

    name, drops_small_sigma = "additive", True

    def scales(self, vector, sigma):
        return vector / sigma

    def deltas(self, vector, sigma):
        return vector


class Multiplicative(UpdateRule):
    """v = g, dimensionless (like Transformer²'s SVF): δ = σ ⊙ g."""

    name, drops_small_sigma = "multiplicative", False

    def scales(self, vector, sigma):
        return vector

    def deltas(self, vector, sigma):
        return vector * sigma


UPDATES: dict[str, UpdateRule] = {rule.name: rule for rule in (Additive(), Multiplicative())}


def update_rule(name: str) -> UpdateRule:
    """The rule called `name`; a ValueError lists the known ones."""
    try:
        return UPDATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"update must be one of {list(UPDATES)}, got {name!r}") from None
