"""The plain two-sided reference every fast path is checked against (fp64, from a fresh SVD).

y = U diag(σ + δ) Vᵀ x + b,    δ = 0 outside the selection S

Computed on the device of the trained vector (or M), whatever device and dtype the layer's weight is in (a GPU
test moves the layer, not the reference).
"""

from __future__ import annotations

import torch


def reference_weight(
    weight: torch.Tensor, indices: list[int], vector: torch.Tensor, update: str
) -> torch.Tensor:
    """W' = U diag(σ + δ) Vᵀ with δ_S = vector (additive) or σ_S ⊙ vector (multiplicative)."""
    weight = weight.detach().to(vector.device, torch.float64)
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    index = torch.tensor(indices, device=vector.device)
    delta = torch.zeros_like(sigma)
    step = vector.double() if update == "additive" else sigma[index] * vector.double()
    delta[index] = step
    return u @ torch.diag(sigma + delta) @ vh


def reference_linear(x, weight, bias, indices, vector, update):
    """The adapted layer applied to x (…, in)."""
    y = x.double() @ reference_weight(weight, indices, vector, update).to(x.device).T
    return y if bias is None else y + bias.detach().to(y.device, torch.float64)


def reference_band_weight(
    weight: torch.Tensor, indices: list[int], matrix: torch.Tensor, side: str
) -> torch.Tensor:
    """W' = W (I + V_S M V_Sᵀ) (input side) or (I + U_S M U_Sᵀ) W (output side), M (r, r) over the selected
    directions in σ order, from a fresh fp64 SVD with each column's largest entry positive (the stored
    bases' sign rule: M's off-diagonal entries depend on the signs)."""
    weight = weight.detach().to(matrix.device, torch.float64)
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    index = torch.tensor(indices, device=matrix.device)
    basis = vh[index].T if side == "input" else u[:, index]  # (d, r)
    rows = basis.abs().argmax(dim=0)
    basis = basis * torch.sign(basis[rows, torch.arange(basis.shape[1], device=matrix.device)])
    projector = basis @ matrix.double() @ basis.T  # (d, d)
    eye = torch.eye(projector.shape[0], dtype=torch.float64, device=matrix.device)
    return weight @ (eye + projector) if side == "input" else (eye + projector) @ weight
