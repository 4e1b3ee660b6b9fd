"""The update rules: what each makes of a trained vector, checked against their definitions, and the
one table SigmaConfig validates against."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig
from sigmatune.core.updates import UPDATES, update_rule

SIGMA = torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64)
VECTOR = torch.tensor([0.4, -0.2, 0.05], dtype=torch.float64)


def test_additive_trains_delta_and_multiplicative_trains_g():
    additive, multiplicative = update_rule("additive"), update_rule("multiplicative")
    torch.testing.assert_close(additive.deltas(VECTOR, SIGMA), VECTOR, rtol=0, atol=0)
    torch.testing.assert_close(additive.scales(VECTOR, SIGMA), VECTOR / SIGMA, rtol=0, atol=0)
    torch.testing.assert_close(multiplicative.scales(VECTOR, SIGMA), VECTOR, rtol=0, atol=0)
    torch.testing.assert_close(multiplicative.deltas(VECTOR, SIGMA), VECTOR * SIGMA, rtol=0, atol=0)
    assert additive.drops_small_sigma and not multiplicative.drops_small_sigma


@pytest.mark.parametrize("name", UPDATES)
def test_every_rule_has_delta_equal_sigma_times_g(name):
    """W' = U diag(σ + δ) Vᵀ = U diag(σ ⊙ (1 + g)) Vᵀ: δ = σ ⊙ g whatever the rule."""
    rule = update_rule(name)
    assert rule.name == name
    torch.testing.assert_close(rule.deltas(VECTOR, SIGMA), SIGMA * rule.scales(VECTOR, SIGMA))


def test_the_config_accepts_exactly_the_rules():
    for name in UPDATES:
        assert SigmaConfig(update=name).update == name
    with pytest.raises(
        ValueError, match=r"update must be one of \['additive', 'multiplicative'\], got 'relative'"
    ):
        SigmaConfig(update="relative")
    with pytest.raises(
        ValueError, match=r"update must be one of \['additive', 'multiplicative'\], got \['g'\]"
    ):
        update_rule(["g"])
