"""The dense structure: a full r × r matrix M over S (LoRA-XS's core, in the singular basis).

    input side:  W' = W (I + V_S M V_Sᵀ)      output side:  W' = (I + U_S M U_Sᵀ) W

r² trained numbers a layer (r ≤ MAX_RANK), read multiplicatively (M's diagonal is g, zero at init). The
mixes are small GEMMs, P Mᵀ and Q M (N × r × r), and dM = Qᵀ P. A serving table holds it as a band as
wide as M (band.py: 2r − 1 diagonals).
"""

from __future__ import annotations

import torch

from .band import dense_to_band
from .base import Structure, wide

MAX_RANK = 256  # r² numbers a layer: 65,536 at the most


class Dense(Structure):
    """M (r, r) over S."""

    name = "dense"

    def shape(self, r: int) -> tuple[int, ...]:
        return (r, r)

    def check(self, r: int, layer_name: str) -> None:
        if r > MAX_RANK:
            raise ValueError(
                f"structure='dense' trains r² numbers a layer; layer {layer_name!r} selects r={r} directions, "
                f"more than {MAX_RANK}: use a rank ≤ {MAX_RANK}, or structure='band'"
            )

    def mix(self, p, coefficients, transposed: bool):
        p, m = wide(p, coefficients)
        m = m.mT if transposed else m
        if m.dim() == 2:
            return p @ m  # (…, r)
        rows = p.reshape(p.shape[0], -1, p.shape[-1])  # one M per leading row: (B, T, r)
        return torch.bmm(rows, m).view(p.shape)

    def grad(self, q, p, coefficients):
        q, p = wide(q, p)
        return q.reshape(-1, q.shape[-1]).T @ p.reshape(-1, p.shape[-1])  # Qᵀ P (r, r)

    def to_dense(self, coefficients):
        return coefficients

    def from_dense(self, matrix, like):
        return matrix.clone()

    def spread(self, coefficients, positions, stored):
        if positions is None:
            return coefficients
        out = coefficients.new_zeros(stored, stored)
        out[positions[:, None], positions[None, :]] = coefficients
        return out  # (R, R)

    def as_band(self, coefficients):
        return dense_to_band(coefficients, coefficients.shape[-1] - 1)
