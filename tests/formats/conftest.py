"""Fixtures of the adapter-file fuzz suites: good adapters to forge from, and a model to load them onto."""

from __future__ import annotations

import pytest

from sigmatune import SigmaConfig, SigmaModel, get_sigma_model
from tests.models import randomize, tiny_llama


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    model = get_sigma_model(tiny_llama(seed=0), SigmaConfig(rank=4))
    randomize(model, seed=3, scale=0.3)
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "bases", save_bases=True)
    other = get_sigma_model(tiny_llama(seed=1), SigmaConfig(rank=4))  # same architecture, other weights
    other.save_pretrained(root / "other-base")
    wider = get_sigma_model(tiny_llama(seed=0, hidden_size=48), SigmaConfig(rank=4))
    wider.save_pretrained(root / "other-shape")
    return root


@pytest.fixture(scope="module")
def target():
    """One wrapped base model that every case is loaded onto (and must leave unchanged)."""
    return SigmaModel(tiny_llama(seed=0))
