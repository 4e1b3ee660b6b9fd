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

Which backend computes the transform is backends.choose's decision (core/backends.py): the GEMMs below
(GEMMS, the plain torch backend every other is checked against) or a fast path of ops/.
"""

from __future__ import annotations

import contextlib

import torch

from .backends import NOTHING_DISABLED, Backend, Call, choose, register
from .structures import half_width


def transform(
    a: torch.Tensor,
    basis: torch.Tensor,
    g: torch.Tensor,
    shift: torch.Tensor | None = None,
    disabled: frozenset[str] = NOTHING_DISABLED,
):
    """a + (((a B) − c) ⊙ g) Bᵀ over a's last dimension: a (…, d), basis B (d, r), g (r,), c (r,) or None;
    with a band C (2w+1, r) in place of g, a + ((a B − c) Mᵀ) Bᵀ.

    Differentiable in a and g (or C). Only the projection P = aB − c (N × r) is kept for backward:
    dg = Σ_rows (dout B) ⊙ P, da = dout + ((dout B) ⊙ g) Bᵀ (a band: dM = (dout B)ᵀ P, of which the
    band is kept, and da = dout + ((dout B) M) Bᵀ). The chosen backend computes both directions (the
    GEMMs below, the second accumulating onto a; or a fast path of ops/); under torch.compile a backend
    may give inductor one node instead (compiled). `disabled`: kernels the caller turned off.
    """
    flat = a.reshape(-1, a.shape[-1])  # (N, d)
    call = Call.of(flat, basis, g, disabled)
    backend = choose(call)
    if call.compiling:
        out = backend.compiled(flat.to(call.dtype), basis.to(call.dtype), g, shift)
        if out is not None:
            return out.view(a.shape)
    return _Transform.apply(flat, basis, g, shift, backend).view(a.shape)


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


def adapt_input(
    x: torch.Tensor, basis: torch.Tensor, g: torch.Tensor, disabled=NOTHING_DISABLED
) -> torch.Tensor:
    """x̃ = x + ((x V_S) ⊙ g) V_Sᵀ: the input whose image under the base layer is the adapted output."""
    return transform(x, basis, g, None, disabled)


def adapt_output(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    g: torch.Tensor,
    disabled=NOTHING_DISABLED,
) -> torch.Tensor:
    """y + ((z U_S) ⊙ g) U_Sᵀ with z = y − b: the base output, adapted on its output side."""
    return transform(y, basis, g, output_shift(bias, basis), disabled)


def output_shift(bias: torch.Tensor | None, basis: torch.Tensor) -> torch.Tensor | None:
    """c = b U_S (r,), or None without a bias: the output side projects z = y − b, and (y − b) U_S = y U_S − c."""
    return None if bias is None else bias.to(basis.dtype) @ basis


class _Transform(torch.autograd.Function):
    """transform() on a 2-D a, saving only what the backend's backward pass needs (the projection).
    Computed in a's dtype (autocast's, when on); g, a band and their gradients in fp32."""

    @staticmethod
    def forward(ctx, a, basis, coefficients, shift, backend: Backend):
        ctx.backend, ctx.input_dtype = backend, a.dtype
        device = a.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast:  # compute in autocast's dtype, as the base linear layer does
            a = a.to(torch.get_autocast_dtype(device))
        basis = basis.to(a.dtype)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():  # as backward
            out, saved = backend.forward_pass(a, basis, coefficients, shift)
        ctx.save_for_backward(saved, basis, coefficients)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, basis, coefficients = ctx.saved_tensors
        grad_a, grad_c = ctx.backend.backward_pass(grad_out, basis, coefficients, saved)
        grad_c = grad_c.to(coefficients.dtype) if ctx.needs_input_grad[2] else None
        return grad_a.to(ctx.input_dtype), None, grad_c, None, None


class Gemms(Backend):
    """The transform by GEMMs in a's dtype, the mixes by torch ops in fp32: the plain torch backend, which
    serves every call (the last in the list). Subclasses may compute the mixes and reductions otherwise
    (ops/ runs them as Triton kernels on CUDA)."""

    name = "torch"

    def supports(self, call: Call) -> bool:
        return True

    def by_ops(self, call: Call) -> bool:
        return (
            call.diagonal
        )  # a diagonal: four torch ops whose backward autograd runs in C++ (core/linear.py)

    def forward_pass(self, a, basis, coefficients, shift):
        """(out, P) by GEMMs: P = aB − c (N, r) in a's dtype; out = a + (P ⊙ g) Bᵀ = a + P (B diag(g))ᵀ, or
        a + (P Mᵀ) Bᵀ with the banded mix summed in fp32."""
        projection = a @ basis  # (N, r)
        if shift is not None:
            projection = projection - shift.to(a.dtype)
        if coefficients.dim() == 1:
            return torch.addmm(a, projection, scaled_basis(basis, coefficients).T), projection
        mixed = self.band_mix(projection, coefficients, transposed=True)  # P Mᵀ in a's dtype
        return torch.addmm(a, mixed, basis.T), projection

    def backward_pass(self, grad, basis, coefficients, saved):
        """(da, dg or dC) with Q = dout B: da = dout + (Q ⊙ g) Bᵀ (a band: + (Q M) Bᵀ); dg = Σ_rows Q ⊙ P,
        dC[w+o, j] = Σ_rows Q[:, j−o] P[:, j]."""
        basis = basis.to(grad.dtype)
        along = grad @ basis  # Q (N, r)
        if coefficients.dim() == 1:
            grad_a = torch.addmm(grad, along, scaled_basis(basis, coefficients).T)
            return grad_a, self.column_dots(along, saved)
        back = self.band_mix(along, coefficients, transposed=False)  # Q M
        grad_c = self.band_grad(along, saved, half_width(coefficients))
        return torch.addmm(grad, back, basis.T), grad_c

    def band_mix(self, p, coefficients, transposed: bool):
        """P Mᵀ (transposed) or P M, summed in fp32, in p's dtype."""
        wide = torch.promote_types(p.dtype, torch.float32)
        mix = band_mix_transposed if transposed else band_mix
        return mix(p.to(wide), coefficients.to(wide)).to(p.dtype)

    def band_grad(self, q, p, w: int):
        """dC (2w+1, r) in fp32: dC[w+o, j] = Σ_rows q[:, j−o] p[:, j]."""
        wide = torch.promote_types(q.dtype, torch.float32)
        return band_grad(q.to(wide), p.to(wide), w)

    def column_dots(self, q, p):
        """Σ_rows q ⊙ p for (N, r): diag(qᵀ p) by one small GEMM when r is small, else in fp32 in one pass."""
        if q.shape[1] <= 256:
            return torch.mm(q.T, p).diagonal()
        wide = torch.promote_types(q.dtype, torch.float32)
        return (q.to(wide) * p.to(wide)).sum(dim=0)


GEMMS = Gemms()
register(GEMMS, last=True)


def scaled_basis(basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B diag(g) (d, r) in the basis' dtype: g is rounded to it first, so no (d, r) fp32 copy is made (a
    bf16 basis times a bf16 g differs from the fp32 product by one more rounding, ~2⁻⁹ relative)."""
    return basis * g.to(basis.dtype)


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
