"""The math of the one-sided form, as plain differentiable torch functions (no nn.Module here).

With the SVD W = U diag(σ) Vᵀ and a selection S, the update U_S diag(δ_S) V_Sᵀ equals
W · V_S diag(g) V_Sᵀ = U_S diag(g) U_Sᵀ · W with g = δ / σ_S, so an adapted layer is the untouched
base layer applied to a transformed input, or followed by a transformed output:

    input side  (in ≤ out):  y = base(x + ((x V_S) ⊙ g) V_Sᵀ)
    output side (in > out):  z = base(x) − b;   y = z + b + ((z U_S) ⊙ g) U_Sᵀ

The extra work per token is two thin GEMMs (N × d × r) forward and two backward; only the
projection x V_S (N × r) is kept for the gradient of g. How g follows from a trained vector is the
update rule's business (updates.py); here g is given.
"""

from __future__ import annotations

import torch

from . import kernels


def transform(a: torch.Tensor, basis: torch.Tensor, g: torch.Tensor, shift: torch.Tensor | None = None):
    """a + (((a B) − c) ⊙ g) Bᵀ over a's last dimension: a (…, d), basis B (d, r), g (r,), c (r,) or None.

    Differentiable in a and g. Only the projection aB − c (N × r) is kept for backward:
    dg = Σ_rows (dout B) ⊙ (aB − c), da = dout + ((dout B) ⊙ g) Bᵀ. On CUDA (r ≤ 128) a fused
    Triton kernel computes each direction in one launch, eager or under torch.compile; otherwise
    two GEMMs do, the second accumulating onto a (addmm).
    """
    flat = a.reshape(-1, a.shape[-1])  # (N, d)
    fused = kernels.available(flat, basis.shape[1]) and (
        kernels.IN_COMPILE or not torch.compiler.is_compiling()
    )
    return _Transform.apply(flat, basis, g, shift, fused).view(a.shape)


def transform_rows(
    a: torch.Tensor, basis: torch.Tensor, g_rows: torch.Tensor, shift: torch.Tensor | None = None
):
    """transform() with one g per leading row: a (B, …, d), g_rows (B, r) — a mixed-adapter batch.

    Costs what one adapter costs: the per-row scales multiply the projection, (B, …, r), before the
    second GEMM. Plain differentiable torch ops (serving needs no custom backward).
    """
    basis = basis.to(a.dtype)
    projected = a @ basis  # (B, …, r)
    if shift is not None:
        projected = projected - shift.to(a.dtype)
    wide = torch.promote_types(a.dtype, torch.float32)
    rows = g_rows.to(wide).view(g_rows.shape[0], *([1] * (a.dim() - 2)), g_rows.shape[1])  # (B, 1…, r)
    return a + (projected.to(wide) * rows).to(a.dtype) @ basis.T


def adapt_input(x: torch.Tensor, basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x̃ = x + ((x V_S) ⊙ g) V_Sᵀ: the input whose image under the base layer is the adapted output."""
    return transform(x, basis, g)


def adapt_output(
    y: torch.Tensor, bias: torch.Tensor | None, basis: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """y + ((z U_S) ⊙ g) U_Sᵀ with z = y − b: the base output, adapted on its output side."""
    return transform(y, basis, g, output_shift(bias, basis))


def output_shift(bias: torch.Tensor | None, basis: torch.Tensor) -> torch.Tensor | None:
    """c = b U_S (r,), or None without a bias: the output side projects z = y − b, and (y − b) U_S = y U_S − c."""
    return None if bias is None else bias.to(basis.dtype) @ basis


class _Transform(torch.autograd.Function):
    """transform() on a 2-D a, saving only the projection: the fused kernel, or GEMMs."""

    @staticmethod
    def forward(ctx, a, basis, g, shift, fused):
        ctx.fused, ctx.input_dtype = fused, a.dtype
        device = a.device.type
        if torch.is_autocast_enabled(device):  # compute in autocast's dtype, as the base linear layer does
            a = a.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):  # one dtype throughout, so backward matches forward
            basis = basis.to(a.dtype)
            if fused:
                out, projection, _ = kernels.transform(a, basis, g, shift)
                scaled_basis = None
            else:
                projection = a @ basis  # (N, r)
                if shift is not None:
                    projection = projection - shift.to(a.dtype)
                scaled_basis = (basis * g).to(a.dtype)  # B diag(g), (d, r): (P ⊙ g) Bᵀ = P (B diag(g))ᵀ
                out = torch.addmm(a, projection, scaled_basis.T)
        ctx.save_for_backward(projection, basis, g, scaled_basis)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        projection, basis, g, scaled_basis = ctx.saved_tensors
        if ctx.fused:
            grad_a, _, grad_g = kernels.transform(grad_out, basis, g, saved=projection)
        else:
            along = grad_out @ basis  # (N, r)
            grad_a = torch.addmm(grad_out, along, scaled_basis.T)
            grad_g = column_dots(along, projection)
        grad_g = grad_g.to(g.dtype) if ctx.needs_input_grad[2] else None
        return grad_a.to(ctx.input_dtype), None, grad_g, None, None


def column_dots(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_rows q ⊙ p for (N, r) matrices: diag(qᵀ p) by one small GEMM when r is small, else in fp32."""
    if q.shape[1] <= 256:
        return torch.mm(q.T, p).diagonal()
    wide = torch.promote_types(q.dtype, torch.float32)
    return (q.to(wide) * p.to(wide)).sum(dim=0)


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
