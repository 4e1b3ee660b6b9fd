"""Compatibility with the seed package `eigentune` 0.1.0: its names, its defaults, its call shapes.

Code written for the seed runs unchanged after `from sigmatune import ...` replaces
`from eigentune import ...`:

    config = EigenTuneConfig(rank=4, target_modules=["q_proj", "v_proj"])   # None = all linear layers
    model = get_eigentune_model(model, config, full_precision_state_dict)   # ready for Trainer

The seed trains δ on the top-r singular values (additive update, exact SVD), matches target
names as substrings, and takes the SVD from a full-precision state dict (keys "<module>.weight").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import SigmaConfig
from ..core.layer import SpectralLinear
from ..core.svd import SpectrumRequest, compute_spectra
from ..core.weights import fingerprint
from .sigma_model import SigmaModel, get_sigma_model


@dataclass
class EigenTuneConfig:
    rank: int = 4  # top singular values trained per layer
    target_modules: list[str] | None = None  # substrings of module names; None = every linear layer

    def to_sigma_config(self) -> SigmaConfig:
        """The equivalent SigmaConfig: principal top-r, additive δ, exact SVD."""
        if self.target_modules is None:
            targets = "all-linear"
        else:
            targets = "(?s).*(?:" + "|".join(re.escape(t) for t in self.target_modules) + ").*"
        return SigmaConfig(rank=self.rank, target_modules=targets, update="additive", svd="exact")


def get_eigentune_model(
    model: nn.Module,
    config: EigenTuneConfig | SigmaConfig,
    full_precision_state_dict: dict[str, torch.Tensor] | None = None,
) -> SigmaModel:
    """The seed's entry point: wrap a model for training; bases from full_precision_state_dict if given."""
    if isinstance(config, EigenTuneConfig):
        config = config.to_sigma_config()
    return get_sigma_model(model, config, full_precision_state_dict=full_precision_state_dict)


def EigenTunedLayer(
    original_layer: nn.Module, rank: int, full_precision_weight: torch.Tensor
) -> SpectralLinear:
    """The seed's layer: original_layer adapted on its top-`rank` singular values (additive, trainable)."""
    weight = full_precision_weight.to(original_layer.weight.device)
    request = SpectrumRequest("layer", weight, list(range(rank)), "exact", fingerprint(weight))
    layer = SpectralLinear(original_layer, compute_spectra([request], progress=False)["layer"])
    layer.add_adapter("default", list(range(rank)), update="additive")
    layer.set_adapter("default")
    return layer
