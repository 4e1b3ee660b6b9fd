"""The structures a config names (SigmaConfig.structure), each a Structure (base.py)."""

from __future__ import annotations

from .band import Band
from .base import Structure
from .dense import Dense
from .diag_rank1 import DiagRank1
from .diagonal import Diagonal

STRUCTURES = ("diagonal", "band", "dense", "diag_rank1")


def structure_of(name: str, band: int = 0) -> Structure:
    """The structure a config names (band: its half-width, for structure='band')."""
    if name == "band":
        return Band(band)
    return {"dense": Dense, "diag_rank1": DiagRank1}.get(name, Diagonal)()
