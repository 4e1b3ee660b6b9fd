"""The band structure: M banded over S (|i − j| ≤ b), zero at init, stored as its 2b + 1 column-aligned
diagonals C (2b+1, r), C[b + o, j] = M[j − o, j] (o > 0 above the diagonal; entries whose row j − o falls
outside 0..r−1 stay zero). M's diagonal is g; a band is read in the multiplicative form only.

The projection P = x V_S is mixed by a banded sum, (P M)_j = Σ_o P_{j−o} C[b+o, j], in fp32. A layer stores
the directions of all its adapters; spread() turns an adapter's band into one over all R stored columns
(its width grows where its columns are not consecutive), so every band a layer or a bank holds is over the
stored columns, and its half-width is read from C's shape.
"""

from __future__ import annotations

import torch

from .base import Structure, per_row, wide


class Band(Structure):
    """M banded over S (|i − j| ≤ b), as its 2b + 1 column-aligned diagonals."""

    name = "band"

    def __init__(self, band: int):
        self.band = band

    def shape(self, r: int) -> tuple[int, ...]:
        return (2 * self.band + 1, r)

    def check(self, r: int, layer_name: str) -> None:
        if self.band >= r:
            raise ValueError(
                f"band={self.band} needs more selected directions than layer {layer_name!r} has (r={r}): "
                f"use band < {r}, or select more directions (a larger rank)"
            )

    def width(self, coefficients: torch.Tensor) -> int:
        return half_width(coefficients)

    def mix(self, p, coefficients, transposed: bool):
        p, c = wide(p, coefficients)
        return band_mix_transposed(p, c) if transposed else band_mix(p, c)

    def grad(self, q, p, coefficients):
        q, p = wide(q, p)
        return band_grad(q, p, half_width(coefficients))

    def to_dense(self, coefficients):
        return band_to_dense(coefficients)

    def from_dense(self, matrix, like):
        return dense_to_band(matrix, half_width(like))

    def spread(self, coefficients, positions, stored, plan=None):
        return spread(coefficients, positions, stored, plan)

    def as_band(self, coefficients):
        return coefficients

    def initial(self, coefficients):
        return valid_part(coefficients)

    def __repr__(self) -> str:
        return f"Band({self.band})"


# ---- bands as column-aligned diagonals (C (2w+1, r), C[w + o, j] = M[j − o, j]) ---------------------


def half_width(coefficients: torch.Tensor) -> int:
    """w of a band (2w+1, r) (or of bands per row, (B, 2w+1, r)); 0 for a diagonal (r,)."""
    return 0 if coefficients.dim() == 1 else (coefficients.shape[-2] - 1) // 2


def valid_part(coefficients: torch.Tensor) -> torch.Tensor:
    """A band with the entries that lie outside M (row j − o not in 0..r−1) set to zero; g as it is."""
    if coefficients.dim() == 1:
        return coefficients
    w, r = half_width(coefficients), coefficients.shape[1]
    offsets = torch.arange(-w, w + 1, device=coefficients.device)[:, None]  # (2w+1, 1)
    rows = torch.arange(r, device=coefficients.device)[None, :] - offsets  # j − o
    return coefficients * ((rows >= 0) & (rows < r))


def band_to_dense(coefficients: torch.Tensor) -> torch.Tensor:
    """M (r, r) from its diagonals (2w+1, r), or diag(g) from g (r,)."""
    if coefficients.dim() == 1:
        return torch.diag(coefficients)
    w, r = half_width(coefficients), coefficients.shape[1]
    dense = coefficients.new_zeros(r, r)
    for o in range(-w, w + 1):
        if abs(o) < r:
            dense += torch.diag(coefficients[w + o, o:] if o >= 0 else coefficients[w + o, : r + o], o)
    return dense


def dense_to_band(matrix: torch.Tensor, w: int) -> torch.Tensor:
    """The 2w+1 column-aligned diagonals (2w+1, r) of a square matrix (what lies outside is dropped)."""
    r = matrix.shape[0]
    coefficients = matrix.new_zeros(2 * w + 1, r)
    for o in range(-w, w + 1):
        if abs(o) < r:
            diagonal = torch.diagonal(matrix, o)
            coefficients[w + o, max(o, 0) : r + min(o, 0)] = diagonal
    return coefficients


def spread(
    coefficients: torch.Tensor,
    positions: torch.Tensor | None,
    stored: int,
    plan: tuple[int, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A band over its own r directions as a band over all `stored` columns of the layer's basis, its
    directions at `positions` (None: all, in order) and zeros elsewhere. It keeps its entries; its
    half-width grows to the widest gap between neighbours within the band (`plan`: spread_plan's answer
    for these positions, when the caller keeps it)."""
    if positions is None:
        return coefficients
    wide, target, source = plan or spread_plan(positions, half_width(coefficients), stored)
    values = coefficients.flatten()[source]  # (K,)
    return coefficients.new_zeros((2 * wide + 1) * stored).index_copy(0, target, values).view(-1, stored)


def spread_plan(positions: torch.Tensor, w: int, stored: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Where a band (2w+1, r) over the columns `positions` lands in a band over all `stored` columns:
    (wide, target, source) with wide the new half-width, and for each of the K entries that lie in M its
    flat index in the (2·wide+1, stored) band and in the (2w+1, r) one. It reads positions on the host:
    a layer computes it once per adapter (SigmaVector.spread)."""
    columns = positions.tolist()
    r = len(columns)
    wide = max([columns[min(j + w, r - 1)] - columns[j] for j in range(r)] + [w])
    target, source = [], []
    for o in range(-w, w + 1):
        for j in range(max(o, 0), r + min(o, 0)):  # j with j − o in range
            target.append((wide + columns[j] - columns[j - o]) * stored + columns[j])
            source.append((w + o) * r + j)
    as_index = dict(dtype=torch.long, device=positions.device)
    return wide, torch.tensor(target, **as_index), torch.tensor(source, **as_index)


# ---- the banded mixes (fp32), one band, or one per leading row ---------------------------------------


def band_mix(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """P M for M given by column-aligned diagonals: (P M)_j = Σ_o P_{j−o} C[w+o, j].

    p (…, r) with c (2w+1, r); or p (B, …, r) with one band per leading row, c (B, 2w+1, r).
    """
    w, r = (c.shape[-2] - 1) // 2, p.shape[-1]
    padded = torch.nn.functional.pad(p, (w, w))  # (…, r + 2w): padded[w + j] = P_j
    return sum(padded[..., w - o : w - o + r] * _diagonal(c, w + o, p) for o in range(-w, w + 1))


def band_mix_transposed(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Q Mᵀ: (Q Mᵀ)_j = Σ_o Q_{j+o} M[j, j+o] = Σ_o (Q ⊙ C[w+o])_{j+o}.

    q (…, r) with c (2w+1, r); or q (B, …, r) with one band per leading row, c (B, 2w+1, r).
    """
    w, r = (c.shape[-2] - 1) // 2, q.shape[-1]
    terms = [
        torch.nn.functional.pad(q * _diagonal(c, w + o, q), (w, w))[..., w + o : w + o + r]
        for o in range(-w, w + 1)
    ]
    return sum(terms)


def band_grad(p: torch.Tensor, q: torch.Tensor, w: int) -> torch.Tensor:
    """∂/∂C of Σ (P M) ⊙ Q over rows, for P, Q (N, r): dC[w+o, j] = Σ_n P[n, j−o] Q[n, j]; (2w+1, r).
    (For Σ (P Mᵀ) ⊙ Q, swap P and Q.)"""
    r = p.shape[-1]
    padded = torch.nn.functional.pad(p, (w, w))
    return torch.stack([(padded[..., w - o : w - o + r] * q).sum(dim=0) for o in range(-w, w + 1)])


def _diagonal(c: torch.Tensor, k: int, p: torch.Tensor) -> torch.Tensor:
    """Row k of a band (r,), or of one band per leading row of p, shaped to broadcast: (B, 1…, r)."""
    return c[k] if c.dim() == 2 else per_row(c[:, k], p)
