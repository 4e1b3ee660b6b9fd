"""The structures a config names (SigmaConfig.structure), each a Structure (base.py)."""

from __future__ import annotations

from .band import Band
from .base import Structure
from .dense import Dense
from .diagonal import Diagonal

STRUCTURES = ("diagonal", "band", "dense")


def structure_of(name: str, band: int = 0) -> Structure:
    """The structure a config names (band: its half-width, for structure='band')."""
    if name == "band":
        return Band(band)
    return Dense() if name == "dense" else Diagonal()
