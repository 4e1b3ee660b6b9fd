"""The math of the one-sided form, as plain differentiable torch functions (no nn.Module here).

With the SVD W = U diag(σ) Vᵀ and a selection S, the update U_S diag(δ_S) V_Sᵀ equals
W · V_S diag(g) V_Sᵀ = U_S diag(g) U_Sᵀ · W with g = δ / σ_S, so an adapted layer is the untouched
base layer applied to a transformed input, or followed by a transformed output:

    input side  (in ≤ out):  y = base(x + ((x V_S) ⊙ g) V_Sᵀ)
    output side (in > out):  z = base(x) − b;   y = z + b + ((z U_S) ⊙ g) U_Sᵀ

The extra work per token is two thin GEMMs (N × d × r) forward and two backward; only the
projection x V_S (N × r) is kept for the gradient of g. How g follows from a trained vector is the
update rule's business (updates.py); here g is given.

A band structure (structures.py) replaces ⊙ g by a banded mix. With W' = W (I + V_S M V_Sᵀ) and rows
of x as row vectors, base(x̃) = x W'ᵀ needs x̃ = x + ((x V_S) Mᵀ) V_Sᵀ (and the output side likewise
y = z + b + ((z U_S) Mᵀ) U_Sᵀ): the projection is mixed by Mᵀ, M given by its 2w+1 column-aligned
diagonals C (C[w+o, j] = M[j−o, j]). Every function here takes either g (r,) or C (2w+1, r) and
tells them apart by their dimension.
"""

from __future__ import annotations

import torch

from . import band_kernels, kernels, transform_op
from .structures import half_width


def transform(a: torch.Tensor, basis: torch.Tensor, g: torch.Tensor, shift: torch.Tensor | None = None):
    """a + (((a B) − c) ⊙ g) Bᵀ over a's last dimension: a (…, d), basis B (d, r), g (r,), c (r,) or None;
    with a band C (2w+1, r) in place of g, a + ((a B − c) Mᵀ) Bᵀ.

    Differentiable in a and g (or C). Only the projection P = aB − c (N × r) is kept for backward:
    dg = Σ_rows (dout B) ⊙ P, da = dout + ((dout B) ⊙ g) Bᵀ (a band: dM = (dout B)ᵀ P, of which the
    band is kept, and da = dout + ((dout B) M) Bᵀ). On CUDA (r ≤ 128) a fused Triton kernel computes
    each direction in one launch, eager or under torch.compile; otherwise GEMMs do, the second
    accumulating onto a (addmm).
    """
    flat = a.reshape(-1, a.shape[-1])  # (N, d)
    fused = kernels.available(flat, basis.shape[1], half_width(g))
    if fused and torch.compiler.is_compiling():
        if kernels.IN_COMPILE:
            return _compiled_transform(flat, basis, g, shift).view(a.shape)
        fused = False  # SIGMATUNE_FUSED_COMPILE=0: inductor traces the GEMMs
    return _Transform.apply(flat, basis, g, shift, fused).view(a.shape)


def _compiled_transform(a, basis, coefficients, shift):
    """transform() under torch.compile: the custom op (transform_op.py, one node for inductor), computed and
    returned in autocast's dtype when it is on, as _Transform does."""
    device = a.device.type
    wanted = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
    out, _ = transform_op.transform(a.to(wanted), basis.to(wanted), coefficients, shift, True)
    return out


def transform_rows(
    a: torch.Tensor, basis: torch.Tensor, g_rows: torch.Tensor, shift: torch.Tensor | None = None
):
    """transform() with one g per leading row: a (B, …, d), g_rows (B, r) — a mixed-adapter batch — or
    one band per row, g_rows (B, 2w+1, r).

    Costs what one adapter costs: the per-row scales multiply (or mix) the projection, (B, …, r),
    before the second GEMM, whose epilogue adds a (addmm). The scaling is in fp32 at least. Plain
    differentiable torch ops, the reference of the mixed-batch kernel (rows_kernels.transform_rows, which a
    served batch takes on CUDA: serving/mixed.py).
    """
    basis = basis.to(a.dtype)
    projected = a @ basis  # (B, …, r)
    if shift is not None:
        projected = projected - shift.to(a.dtype)
    wide = torch.promote_types(a.dtype, torch.float32)
    if g_rows.dim() == 3:
        scaled = band_mix_transposed(projected.to(wide), g_rows.to(wide))
    else:
        scaled = projected * _per_row(g_rows.to(wide), a)  # (B, …, r), promoted to fp32 (or fp64)
    flat = a.reshape(-1, a.shape[-1])
    return torch.addmm(flat, scaled.to(a.dtype).reshape(flat.shape[0], -1), basis.T).view(a.shape)


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
    """transform() on a 2-D a, saving only the projection: the fused kernel, or GEMMs (forward_pass,
    backward_pass). Computed in a's dtype (autocast's, when on); g, a band and their gradients in fp32."""

    @staticmethod
    def forward(ctx, a, basis, coefficients, shift, fused):
        ctx.fused, ctx.input_dtype = fused, a.dtype
        device = a.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast:  # compute in autocast's dtype, as the base linear layer does
            a = a.to(torch.get_autocast_dtype(device))
        basis = basis.to(a.dtype)
        if autocast and not fused:  # (no autocast inside a Triton kernel)
            with torch.autocast(device, enabled=False):  # one dtype throughout, so backward matches forward
                out, projection = forward_pass(a, basis, coefficients, shift, fused)
        else:
            out, projection = forward_pass(a, basis, coefficients, shift, fused)
        ctx.save_for_backward(projection, basis, coefficients)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        projection, basis, coefficients = ctx.saved_tensors
        grad_a, grad_c = backward_pass(grad_out, basis, coefficients, projection, ctx.fused)
        grad_c = grad_c.to(coefficients.dtype) if ctx.needs_input_grad[2] else None
        return grad_a.to(ctx.input_dtype), None, grad_c, None, None


def forward_pass(a, basis, coefficients, shift, fused: bool):
    """(out, P) of transform() for a 2-D a and a basis in a's dtype: one launch of the fused kernel (P fp32,
    padded to its width) or the GEMMs (P in a's dtype)."""
    if fused:
        out, projection, _ = kernels.transform(a, basis, coefficients, shift, transposed=True)
        return out, projection
    return _gemm_forward(a, basis, coefficients, shift)


def backward_pass(grad_out, basis, coefficients, projection, fused: bool):
    """(da, dg or dC) of transform() for the incoming gradient and the forward pass's projection, by the
    path that made it."""
    if fused:
        grad_a, _, grad_c = kernels.transform(grad_out, basis, coefficients, saved=projection)
        return grad_a, grad_c
    return _gemm_backward(grad_out, basis, coefficients, projection)


def _gemm_forward(a, basis, coefficients, shift):
    """(out, P) by GEMMs in a's dtype: P = aB − c (N, r); out = a + (P ⊙ g) Bᵀ = a + P (B diag(g))ᵀ, or
    a + (P Mᵀ) Bᵀ with the banded mix summed in fp32."""
    projection = a @ basis  # (N, r)
    if shift is not None:
        projection = projection - shift.to(a.dtype)
    if coefficients.dim() == 1:
        return torch.addmm(a, projection, scaled_basis(basis, coefficients).T), projection
    if band_kernels.available(projection, half_width(coefficients)):
        mixed = band_kernels.mix(projection, coefficients, transposed=True)  # P Mᵀ, summed in fp32
    else:
        wide = torch.promote_types(a.dtype, torch.float32)
        mixed = band_mix_transposed(projection.to(wide), coefficients.to(wide)).to(a.dtype)  # P Mᵀ
    return torch.addmm(a, mixed, basis.T), projection


def _gemm_backward(grad_out, basis, coefficients, projection):
    """(da, dg or dC) by GEMMs, with Q = dout B: da = dout + (Q ⊙ g) Bᵀ (a band: + (Q M) Bᵀ);
    dg = Σ_rows Q ⊙ P, dC[w+o, j] = Σ_rows Q[:, j−o] P[:, j]."""
    basis = basis.to(grad_out.dtype)
    along = grad_out @ basis  # Q (N, r)
    if coefficients.dim() == 1:
        grad_a = torch.addmm(grad_out, along, scaled_basis(basis, coefficients).T)
        return grad_a, column_dots(along, projection)
    w = half_width(coefficients)
    if band_kernels.available(along, w):  # summed in fp32, one pass each
        back, grad_c = band_kernels.mix(along, coefficients), band_kernels.grad(along, projection, w)
    else:
        wide = torch.promote_types(grad_out.dtype, torch.float32)
        back = band_mix(along.to(wide), coefficients.to(wide)).to(grad_out.dtype)  # Q M
        grad_c = band_grad(along.to(wide), projection.to(wide), w)
    return torch.addmm(grad_out, back, basis.T), grad_c


def scaled_basis(basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B diag(g) (d, r) in the basis' dtype: g is rounded to it first, so no (d, r) fp32 copy is made (a
    bf16 basis times a bf16 g differs from the fp32 product by one more rounding, ~2⁻⁹ relative)."""
    return basis * g.to(basis.dtype)


def column_dots(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_rows q ⊙ p for (N, r) matrices: diag(qᵀ p) by one small GEMM when r is small; else summed in fp32
    in one pass over q and p (band_kernels' gradient of a band of half-width 0) on CUDA, or by torch ops."""
    if q.shape[1] <= 256:
        return torch.mm(q.T, p).diagonal()
    if band_kernels.available(q, 0):
        return band_kernels.grad(q, p, 0)[0]
    wide = torch.promote_types(q.dtype, torch.float32)
    return (q.to(wide) * p.to(wide)).sum(dim=0)


# ---- bands -------------------------------------------------------------------------------------------


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
    return c[k] if c.dim() == 2 else _per_row(c[:, k], p)


def _per_row(rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(B, r) → (B, 1…, r): one row per leading row of a (B, …, d)."""
    return rows.view(rows.shape[0], *([1] * (a.dim() - 2)), rows.shape[1])


# ---- merging ---------------------------------------------------------------------------------------------


def inverse_scales(m: torch.Tensor) -> torch.Tensor:
    """The update that undoes m on the subspace, for orthonormal B: with g (r,), g' = −g / (1 + g) so that
    (I + B diag(g) Bᵀ)(I + B diag(g') Bᵀ) = I; with a dense M (r, r), M' = (I + M)⁻¹ − I."""
    if m.dim() == 2:
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        inverse, info = torch.linalg.inv_ex(eye + m)
        if int(info) != 0:
            raise ValueError(
                "cannot undo this update: I + M is singular (it maps a direction to zero); "
                "reload the base weights instead"
            )
        return inverse - eye
    if bool((1 + m == 0).any()):
        raise ValueError(
            "cannot undo this update: it sets a singular value to exactly zero (g = -1), "
            "which loses the direction; reload the base weights instead"
        )
    return -m / (1 + m)


def apply_to_weight(weight: torch.Tensor, basis: torch.Tensor, m: torch.Tensor, side: str) -> torch.Tensor:
    """The merged weight W' for a dense (out, in) weight: W (I + V M Vᵀ) or (I + U M Uᵀ) W, with M = diag(g)
    for g (r,), or a dense M (r, r).

    Equal to U diag(σ + δ) Vᵀ when the basis holds exact singular vectors of W and M = diag(g).
    """
    basis = basis.to(weight.dtype)
    m = m.to(weight.dtype)
    if m.dim() == 2:
        if side == "input":
            return weight + ((weight @ basis) @ m) @ basis.T  # (out, in)
        return weight + basis @ (m @ (basis.T @ weight))  # (out, in)
    if side == "input":
        return weight + ((weight @ basis) * m) @ basis.T  # (out, in)
    return weight + basis @ (m[:, None] * (basis.T @ weight))  # (out, in)
