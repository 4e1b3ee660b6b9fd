"""Does a saved adapter fit this base model? Layer names and shapes first, then the spectra.

The saved σ at the adapter's indices must match the base's own within SPECTRUM_TOLERANCE · σ_max:
the same model in another dtype passes (σ moves by about the rounding error), another model of the
same architecture does not.
"""

from __future__ import annotations

from torch import nn

from ..core.layer import SpectralLinear
from ..core.targets import linear_shapes
from .adapter_file import AdapterRecord

SPECTRUM_TOLERANCE = 2e-2  # |σ_saved − σ_base| ≤ this · σ_max per layer


class BaseModelMismatchError(ValueError):
    """An adapter was loaded onto a base model other than the one it was trained on."""


def check_structure(model_id, record: AdapterRecord, base_model: nn.Module) -> None:
    """The adapter's layers exist in the base model, with the shapes it was trained on."""
    shapes = linear_shapes(base_model)
    missing = [name for name in record.layers if name not in shapes]
    wrong = [
        f"{name} {shapes[name]} ≠ {(layer.out_features, layer.in_features)}"
        for name, layer in record.layers.items()
        if name in shapes and shapes[name] != (layer.out_features, layer.in_features)
    ]
    if missing or wrong:
        raise BaseModelMismatchError(
            f"{model_id}: this adapter was trained on another base model "
            f"({record.base_model_name_or_path or 'unnamed'}): "
            + (f"layers {missing[:3]} do not exist here; " if missing else "")
            + (f"layer shapes differ: {wrong[:3]}; " if wrong else "")
            + "load it onto the model it was trained on"
        )


def check_spectra(model_id, record: AdapterRecord, spectral: dict[str, SpectralLinear]) -> None:
    """The saved σ at the adapter's indices match the wrapped layers' own (SPECTRUM_TOLERANCE · σ_max)."""
    worst = []
    for name, saved in record.layers.items():
        layer = spectral[name]
        now = layer.sigma_at(layer.positions_for(saved.indices.tolist()))
        error = float((now.cpu().double() - saved.sigma.double()).abs().max() / layer.sigma_max.double())
        if error > SPECTRUM_TOLERANCE:
            worst.append((error, name))
    if worst:
        error, name = max(worst)
        raise BaseModelMismatchError(
            f"{model_id}: this adapter was trained on another base model "
            f"({record.base_model_name_or_path or 'unnamed'}, fingerprint {record.base_fingerprint}): the singular "
            f"values of {len(worst)} layers differ, {name!r} by {100 * error:.1f}% of σ_max; "
            "load it onto the model it was trained on"
        )
