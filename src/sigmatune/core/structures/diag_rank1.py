"""The diagonal plus a rank-1 term: M = diag(g) + u vᵀ over S (an experiment of issue 40, kept only if the
quality suite says so).

    input side:  W' = W (I + V_S M V_Sᵀ) = W (I + V_S diag(g) V_Sᵀ) + (W V_S u)(V_S v)ᵀ

the spectral scaling with, beside it, a rank-1 update whose two factors live in the singular basis — LoRA r1's
degree of freedom (which beat a band of the same size on a task outside the benchmarks) at 3r numbers a layer.
C = [g; u; v] (3, r), read multiplicatively. At init g = v = 0 and u = 1/√r (as LoRA starts with B = 0 and A
not): the adapter is the identity, and v has a gradient from the first step, u once v moves.

    forward  P Mᵀ = P ⊙ g + (P v) uᵀ        backward  Q M = Q ⊙ g + (Q u) vᵀ
    grad     dg = Σ Q ⊙ P,  du = Qᵀ (P v),  dv = Pᵀ (Q u)
"""

from __future__ import annotations

import torch

from .band import dense_to_band
from .base import Structure, per_row, wide


class DiagRank1(Structure):
    """C = [g; u; v] (3, r): M = diag(g) + u vᵀ over S."""

    name = "diag_rank1"

    def shape(self, r: int) -> tuple[int, ...]:
        return (3, r)

    def start(self, coefficients: torch.Tensor) -> torch.Tensor:
        start = coefficients.clone()
        start[1] = coefficients.shape[-1] ** -0.5  # u: a fixed unit direction; g = v = 0
        return start

    def mix(self, p, coefficients, transposed: bool):
        p, c = wide(p, coefficients)
        g, u, v = c.unbind(-2)  # (r,) each, or (B, r) for one C per leading row
        first, second = (v, u) if transposed else (u, v)
        if c.dim() == 2:
            return p * g + (p @ first)[..., None] * second
        g, first, second = (per_row(t, p) for t in (g, first, second))
        return p * g + (p * first).sum(dim=-1, keepdim=True) * second

    def grad(self, q, p, coefficients):
        q, p, c = wide(q, p, coefficients)
        q, p = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])  # (N, r)
        return torch.stack([(q * p).sum(dim=0), q.T @ (p @ c[2]), p.T @ (q @ c[1])])

    def to_dense(self, coefficients):
        return torch.diag(coefficients[0]) + torch.outer(coefficients[1], coefficients[2])

    def from_dense(self, matrix, like):
        """M's diagonal, and the rank-1 term closest to what lies off it (exact where that part is rank 1)."""
        off = matrix - torch.diag(torch.diagonal(matrix))
        left, values, right = torch.linalg.svd(off)
        u, v = left[:, 0] * values[0].sqrt(), right[0] * values[0].sqrt()
        return torch.stack([torch.diagonal(matrix) - u * v, u, v]).to(like.dtype)

    def restrict(self, coefficients, index):
        return coefficients[:, index]

    def spread(self, coefficients, positions, stored):
        if positions is None:
            return coefficients
        return coefficients.new_zeros(3, stored).index_copy(1, positions, coefficients)  # (3, R)

    def as_band(self, coefficients):
        return dense_to_band(self.to_dense(coefficients), coefficients.shape[-1] - 1)
