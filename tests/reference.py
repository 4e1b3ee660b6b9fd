"""The plain two-sided reference every fast path is checked against (fp64, from a fresh SVD).

y = U diag(σ + δ) Vᵀ x + b,    δ = 0 outside the selection S
"""

from __future__ import annotations

import torch


def reference_weight(
    weight: torch.Tensor, indices: list[int], vector: torch.Tensor, update: str
) -> torch.Tensor:
    """W' = U diag(σ + δ) Vᵀ with δ_S = vector (additive) or σ_S ⊙ vector (multiplicative)."""
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    index = torch.tensor(indices)
    delta = torch.zeros_like(sigma)
    step = vector.double() if update == "additive" else sigma[index] * vector.double()
    delta[index] = step
    return u @ torch.diag(sigma + delta) @ vh


def reference_linear(x, weight, bias, indices, vector, update):
    """The adapted layer applied to x (…, in)."""
    y = x.double() @ reference_weight(weight, indices, vector, update).T
    return y if bias is None else y + bias.double()
