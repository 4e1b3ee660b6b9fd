"""The math of the one-sided form, as plain differentiable torch functions (no nn.Module here).

With the SVD W = U diag(σ) Vᵀ and a selection S, the update U_S diag(δ_S) V_Sᵀ equals
W · V_S diag(g) V_Sᵀ = U_S diag(g) U_Sᵀ · W with g = δ / σ_S, so an adapted layer is the untouched
base layer applied to a transformed input, or followed by a transformed output:

    input side  (in ≤ out):  y = base(x + ((x V_S) ⊙ g) V_Sᵀ)
    output side (in > out):  z = base(x) − b;   y = z + b + ((z U_S) ⊙ g) U_Sᵀ

The extra work per token is two thin GEMMs (N × d × r) forward and two backward; autograd keeps
only the projection x V_S (N × r) for the gradient of g.
"""

from __future__ import annotations

import torch


def scales(vector: torch.Tensor, sigma: torch.Tensor, update: str) -> torch.Tensor:
    """g, the per-direction scale of the one-sided form, from a trained vector over S.

    multiplicative: the vector is g itself (δ = σ ⊙ g); additive: the vector is δ, so g = δ / σ.
    """
    if update == "multiplicative":
        return vector
    return vector / sigma.to(torch.promote_types(vector.dtype, sigma.dtype))


def deltas(vector: torch.Tensor, sigma: torch.Tensor, update: str) -> torch.Tensor:
    """δ, the change of the selected singular values (σ_S → σ_S + δ), from a trained vector."""
    if update == "additive":
        return vector
    return vector * sigma.to(torch.promote_types(vector.dtype, sigma.dtype))


def spectral_term(x: torch.Tensor, basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """((x B) ⊙ g) Bᵀ for x (…, d), basis B (d, r), g (r,) → (…, d).

    The projection runs in x's dtype (the GEMMs accumulate in fp32); the scaling by g is done in at
    least fp32 and rounded once back to x's dtype.
    """
    basis = basis.to(x.dtype)
    projected = x @ basis  # (…, r)
    wide = torch.promote_types(x.dtype, torch.float32)
    scaled = (projected.to(wide) * g.to(wide)).to(x.dtype)  # (…, r)
    return scaled @ basis.T  # (…, d)


def adapt_input(x: torch.Tensor, basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x̃ = x + ((x V_S) ⊙ g) V_Sᵀ: the input whose image under the base layer is the adapted output."""
    return x + spectral_term(x, basis, g)


def adapt_output(
    y: torch.Tensor, bias: torch.Tensor | None, basis: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """y + ((z U_S) ⊙ g) U_Sᵀ with z = y − b: the base output, adapted on its output side."""
    z = y if bias is None else y - bias.to(y.dtype)
    return y + spectral_term(z, basis, g)


def inverse_scales(g: torch.Tensor) -> torch.Tensor:
    """g' with (I + B diag(g) Bᵀ)(I + B diag(g') Bᵀ) = I for orthonormal B: g' = −g / (1 + g)."""
    if bool((1 + g == 0).any()):
        raise ValueError(
            "cannot undo this update: it sets a singular value to exactly zero (g = -1), "
            "which loses the direction; reload the base weights instead"
        )
    return -g / (1 + g)


def apply_to_weight(weight: torch.Tensor, basis: torch.Tensor, g: torch.Tensor, side: str) -> torch.Tensor:
    """The merged weight W' for a dense (out, in) weight: W (I + V diag(g) Vᵀ) or (I + U diag(g) Uᵀ) W.

    Equal to U diag(σ + δ) Vᵀ when the basis holds exact singular vectors of W.
    """
    basis = basis.to(weight.dtype)
    g = g.to(weight.dtype)
    if side == "input":
        return weight + ((weight @ basis) * g) @ basis.T  # (out, in)
    return weight + basis @ (g[:, None] * (basis.T @ weight))  # (out, in)
