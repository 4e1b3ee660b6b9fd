"""The Structure protocol: one object per kind of adapter structure, owning all of its math.

An adapter trains coefficients C over its r selected directions (in σ order). Read through the update
rule, C is a matrix M over S (M = diag(g) for the diagonal), and the adapted layer is, on its input side,

    W' = W (I + V_S M V_Sᵀ)      →  y = base(x + ((x V_S) Mᵀ) V_Sᵀ)       (rows of x as row vectors)

(the output side likewise with U_S and z = base(x) − b). What a structure says about its C:

    shape(r)                 the trained tensor over r directions
    mix(P, C, transposed)    P Mᵀ (transposed: the forward pass) or P M (backward), P (…, r); one C per
                             leading row of P when C has one more dimension (a mixed batch)
    grad(Q, P, C)            ∂/∂C of Σ (P Mᵀ) ⊙ Q over rows: dC (C's shape)
    to_dense(C) / from_dense(M, like)   M (r, r), and back (what lies outside the structure is dropped)
    restrict(C, index)       the structure over the directions at `index` (compression)
    spread(C, positions, R)  C over all R stored columns of a layer, its directions at `positions`
    as_band(C)               g, or the column-aligned diagonals of M: a serving table's row (band.py)
    initial(C)               C with the entries outside the structure zeroed (a random init)

A new structure is one file with a subclass and its line in registry.py; every consumer (the layer, the
GEMM backend, merging, LoRA export, compression, files, serving tables) calls these methods.
"""

from __future__ import annotations

import torch

from ..updates import UpdateRule


class Structure:
    """One adapter structure (see the module docstring). Subclasses set name and implement the math."""

    name = "?"
    elementwise = False  # True: M = diag(g), so (P ⊙ g) Bᵀ = P (B diag(g))ᵀ may fold g into the basis

    def shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def check(self, r: int, layer_name: str) -> None:
        """Refuse a layer where the structure does not fit r selected directions."""

    def check_rule(self, rule: UpdateRule) -> None:
        """Refuse an update rule the structure cannot express (a matrix M is read multiplicatively)."""
        if not self.elementwise and rule.name != "multiplicative":
            raise ValueError(
                f"structure={self.name!r} trains M in the multiplicative form (its diagonal is g); "
                f"update={rule.name!r} cannot express it: use update='multiplicative', or structure='diagonal'"
            )

    def width(self, coefficients: torch.Tensor) -> int | None:
        """A band's half-width w, 0 for a diagonal, None for anything a band kernel cannot take."""
        return None

    def mix(self, p: torch.Tensor, coefficients: torch.Tensor, transposed: bool) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, q: torch.Tensor, p: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self, coefficients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_dense(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def restrict(self, coefficients: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.from_dense(self.to_dense(coefficients)[index][:, index], coefficients)

    def spread(self, coefficients: torch.Tensor, positions: torch.Tensor | None, stored: int) -> torch.Tensor:
        raise NotImplementedError

    def as_band(self, coefficients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial(self, coefficients: torch.Tensor) -> torch.Tensor:
        return coefficients

    def diagonal(self, coefficients: torch.Tensor) -> torch.Tensor:
        """g (r,): M's diagonal (inspect shows it)."""
        return torch.diagonal(self.to_dense(coefficients))

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


def per_row(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B, r) → (B, 1…, r): one row per leading row of p (B, …, r), shaped to broadcast."""
    return rows.view(rows.shape[0], *([1] * (p.dim() - 2)), rows.shape[1])


def wide(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in fp32 at least (fp64 stays fp64): where the mixes sum."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]
