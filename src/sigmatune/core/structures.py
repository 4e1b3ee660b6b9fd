"""Adapter structures: what an adapter trains over its r selected directions S, in σ order.

    diagonal   g (r,)                 W' = U diag(σ ⊙ (1 + g)) Vᵀ on S        (today's vector)
    band b     M (r × r), |i − j| ≤ b  input side:  W' = W (I + V_S M V_Sᵀ)
                                       output side: W' = (I + U_S M U_Sᵀ) W
               stored as its 2b + 1 diagonals, column-aligned: C[b + o, j] = M[j − o, j]
               (o > 0 above the diagonal; entries whose row j − o falls outside 0..r−1 stay zero)

The diagonal of M is the diagonal structure's g, and the one-sided form carries over: the projection
P = x V_S is mixed by M (a banded mix, (P M)_j = Σ_o P_{j−o} C[b+o, j]) before V_Sᵀ. A band is read in
the multiplicative form only (M is dimensionless, M_ii = g_i), so it takes update="multiplicative".

A layer stores the directions of all its adapters; an adapter's own directions sit at columns
`positions` of that basis. spread() turns an adapter's band into one over all R stored columns (its
width grows where its columns are not consecutive), so every band a layer or a bank holds is over
the stored columns. A new structure is one more Structure here, and its mixes in functional.py.
"""

from __future__ import annotations

import torch

from .updates import UpdateRule


class Structure:
    """One adapter structure: the shape of what it trains, and the checks on it."""

    name: str

    def shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def check(self, r: int, layer_name: str) -> None:
        """Refuse a layer where the structure does not fit r selected directions."""

    def check_rule(self, rule: UpdateRule) -> None:
        """Refuse an update rule the structure cannot express."""


class Diagonal(Structure):
    """g over S: one number per direction (the default)."""

    name = "diagonal"

    def shape(self, r: int) -> tuple[int, ...]:
        return (r,)


class Band(Structure):
    """M banded over S (|i − j| ≤ b), zero at init, stored as its 2b + 1 column-aligned diagonals."""

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

    def check_rule(self, rule: UpdateRule) -> None:
        if rule.name != "multiplicative":
            raise ValueError(
                f"structure='band' trains M in the multiplicative form (its diagonal is g); update={rule.name!r} "
                "cannot express it: use update='multiplicative', or structure='diagonal'"
            )

    def __repr__(self) -> str:
        return f"Band({self.band})"


STRUCTURES = ("diagonal", "band")


def structure_of(name: str, band: int = 0) -> Structure:
    """The structure a config names (band: its half-width, for structure='band')."""
    return Band(band) if name == "band" else Diagonal()


# ---- bands as column-aligned diagonals (C (2w+1, r), C[w + o, j] = M[j − o, j]) ---------------------


def half_width(coefficients: torch.Tensor) -> int:
    """w of a band (2w+1, r); 0 for a diagonal (r,)."""
    return 0 if coefficients.dim() == 1 else (coefficients.shape[0] - 1) // 2


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
    """An adapter's coefficients over its own r directions as coefficients over all `stored` columns of
    the layer's basis, its directions at `positions` (None: all, in order) and zeros elsewhere. A band
    keeps its entries; its half-width grows to the widest gap between neighbours within the band
    (`plan`: spread_plan's answer for these positions, when the caller keeps it)."""
    if positions is None:
        return coefficients
    if coefficients.dim() == 1:
        return coefficients.new_zeros(stored).index_copy(0, positions, coefficients)  # (R,)
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
