"""The diagonal structure: g over S, one number per direction (the default).

W' = U diag(σ ⊙ (1 + g)) Vᵀ on S,  M = diag(g):  P Mᵀ = P M = P ⊙ g,  ∂/∂g Σ (P ⊙ g) ⊙ Q = Σ_rows P ⊙ Q
"""

from __future__ import annotations

import torch

from .base import Structure, per_row, wide


class Diagonal(Structure):
    """g over S: one number per direction."""

    name = "diagonal"
    elementwise = True

    def shape(self, r: int) -> tuple[int, ...]:
        return (r,)

    def check_rule(self, rule) -> None:
        """Every update rule reads a vector."""

    def width(self, coefficients: torch.Tensor) -> int:
        return 0

    def mix(self, p, coefficients, transposed: bool):
        p, g = wide(p, coefficients)
        return p * (g if g.dim() == 1 else per_row(g, p))  # one g, or one per leading row of p

    def grad(self, q, p, coefficients):
        q, p = wide(q, p)
        return (q * p).reshape(-1, q.shape[-1]).sum(dim=0)

    def to_dense(self, coefficients):
        return torch.diag(coefficients)

    def from_dense(self, matrix, like):
        return torch.diagonal(matrix).clone()

    def restrict(self, coefficients, index):
        return coefficients[index]

    def spread(self, coefficients, positions, stored):
        if positions is None:
            return coefficients
        return coefficients.new_zeros(stored).index_copy(0, positions, coefficients)  # (R,)

    def as_band(self, coefficients):
        return coefficients  # a serving table keeps vectors until a band comes

    def diagonal(self, coefficients):
        return coefficients
