"""The math of the one-sided form, as plain differentiable torch functions (no nn.Module here).

With the SVD W = U diag(σ) Vᵀ and a selection S, the update U_S diag(δ_S) V_Sᵀ equals
W · V_S diag(g) V_Sᵀ = U_S diag(g) U_Sᵀ · W with g = δ / σ_S, so an adapted layer is the untouched
base layer applied to a transformed input, or followed by a transformed output:

    input side  (in ≤ out):  y = base(x + ((x V_S) ⊙ g) V_Sᵀ)
    output side (in > out):  z = base(x) − b;   y = z + b + ((z U_S) ⊙ g) U_Sᵀ

The extra work per token is two thin GEMMs (N × d × r) forward and two backward; only the
projection x V_S (N × r) is kept for the gradient of g. How g follows from a trained vector is the
update rule's business (updates.py); here g is given.

Another structure (structures/) replaces ⊙ g by its mix. With W' = W (I + V_S M V_Sᵀ) and rows of x as
row vectors, base(x̃) = x W'ᵀ needs x̃ = x + ((x V_S) Mᵀ) V_Sᵀ (and the output side likewise
y = z + b + ((z U_S) Mᵀ) U_Sᵀ): the projection is mixed by Mᵀ. Every function here takes the coefficients
C (g, a band's diagonals, M) with their Structure, which does the mixing (Structure.mix, .grad).

Which backend computes the transform is backends.choose's decision (core/backends.py): the GEMMs below
(GEMMS, the plain torch backend every other is checked against) or a fast path of ops/.
"""

from __future__ import annotations

import contextlib

import torch

from .backends import NOTHING_DISABLED, Backend, Call, choose, register
from .structures.base import Structure, wide
from .structures.diagonal import Diagonal

DIAGONAL = Diagonal()
# up to this r a diagonal's dg is the diagonal of one r × r GEMM (and, for ops' band backend, not its kernel)
SMALL_RANK = 256


def transform(
    a: torch.Tensor,
    basis: torch.Tensor,
    g: torch.Tensor,
    shift: torch.Tensor | None = None,
    disabled: frozenset[str] = NOTHING_DISABLED,
    structure: Structure = DIAGONAL,
):
    """a + (((a B) − c) ⊙ g) Bᵀ over a's last dimension: a (…, d), basis B (d, r), g (r,), c (r,) or None;
    with another structure's coefficients C in place of g, a + ((a B − c) Mᵀ) Bᵀ.

    Differentiable in a and g (or C). Only the projection P = aB − c (N × r) is kept for backward:
    dg = Σ_rows (dout B) ⊙ P, da = dout + ((dout B) ⊙ g) Bᵀ (any M: dM = (dout B)ᵀ P, of which the
    structure keeps its part, and da = dout + ((dout B) M) Bᵀ). The chosen backend computes both
    directions (the GEMMs below, the second accumulating onto a; or a fast path of ops/); under
    torch.compile a backend may give inductor one node instead (compiled). `disabled`: kernels the
    caller turned off.
    """
    flat = a.reshape(-1, a.shape[-1])  # (N, d)
    call = Call.of(flat, basis, g, structure, disabled)
    backend = choose(call)
    if call.compiling:
        out = backend.compiled(flat.to(call.dtype), basis.to(call.dtype), g, shift, structure)
        if out is not None:
            return out.view(a.shape)
    return _Transform.apply(flat, basis, g, shift, backend, structure, False).view(a.shape)


def transform_rows(
    a: torch.Tensor,
    basis: torch.Tensor,
    rows: torch.Tensor,
    shift: torch.Tensor | None = None,
    structure: Structure = DIAGONAL,
    disabled: frozenset[str] = NOTHING_DISABLED,
):
    """transform() with one set of coefficients per leading row: a (B, …, d), rows (B, r) of g — a
    mixed-adapter batch — or (B, …) of `structure`'s (bands: (B, 2w+1, r)).

    Costs what one adapter costs: the per-row coefficients mix the projection (B, …, r) between the two
    GEMMs (a diagonal's in a's dtype, g rounded to it as one adapter's is; other structures' in fp32 at least).
    Differentiable in a and rows (not in the shift: the base's bias is frozen), each leading row's
    coefficients getting the gradient of its own tokens only (for g: Σ over row b's tokens of Q ⊙ P): the
    chosen backend's passes with rows=True (the GEMMs below; the fused kernel for a diagonal), or under
    torch.compile the GEMMs' forward as plain ops that inductor differentiates. A served batch on CUDA takes the
    mixed-batch kernel instead where it can (serving/ops/rows_kernel.fused_transform_rows, checked against this).
    """
    if a.shape[0] != rows.shape[0]:
        raise ValueError(f"{a.shape[0]} leading rows of the input but coefficients for {rows.shape[0]}")
    flat = a.reshape(-1, a.shape[-1])  # (N, d): leading row b is flat's block b of N / B rows
    if flat.shape[0] == 0:
        return a.clone()
    call = Call.of(flat, basis, rows[0], structure, disabled, rows=True)
    if call.compiling:  # the GEMMs' forward as plain ops: inductor differentiates them and fuses the mix
        flat, basis = flat.to(call.dtype), basis.to(call.dtype)
        return GEMMS.forward_pass(flat, basis, rows, shift, structure, rows=True)[0].view(a.shape)
    backend = choose(call)
    return _Transform.apply(flat, basis, rows, shift, backend, structure, True).view(a.shape)


def adapt_input(x, basis, g, disabled=NOTHING_DISABLED, structure: Structure = DIAGONAL) -> torch.Tensor:
    """x̃ = x + ((x V_S) ⊙ g) V_Sᵀ: the input whose image under the base layer is the adapted output."""
    return transform(x, basis, g, None, disabled, structure)


def adapt_output(
    y, bias: torch.Tensor | None, basis, g, disabled=NOTHING_DISABLED, structure: Structure = DIAGONAL
) -> torch.Tensor:
    """y + ((z U_S) ⊙ g) U_Sᵀ with z = y − b: the base output, adapted on its output side."""
    return transform(y, basis, g, output_shift(bias, basis), disabled, structure)


def output_shift(bias: torch.Tensor | None, basis: torch.Tensor) -> torch.Tensor | None:
    """c = b U_S (r,), or None without a bias: the output side projects z = y − b, and (y − b) U_S = y U_S − c."""
    return None if bias is None else bias.to(basis.dtype) @ basis


class _Transform(torch.autograd.Function):
    """transform() (or, rows, transform_rows()) on a 2-D a, saving only what the backend's backward pass
    needs (the projection). Computed in a's dtype (autocast's, when on); the coefficients and their gradient
    in fp32."""

    @staticmethod
    def forward(ctx, a, basis, coefficients, shift, backend: Backend, structure: Structure, rows: bool):
        ctx.backend, ctx.structure, ctx.input_dtype, ctx.rows = backend, structure, a.dtype, rows
        device = a.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast:  # compute in autocast's dtype, as the base linear layer does
            a = a.to(torch.get_autocast_dtype(device))
        basis = basis.to(a.dtype)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():  # as backward
            out, saved = backend.forward_pass(a, basis, coefficients, shift, structure, rows)
        ctx.save_for_backward(saved, basis, coefficients)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, basis, coefficients = ctx.saved_tensors
        backend, structure = ctx.backend, ctx.structure
        grad_a, grad_c = backend.backward_pass(grad_out, basis, coefficients, saved, structure, ctx.rows)
        grad_c = grad_c.to(coefficients.dtype) if ctx.needs_input_grad[2] else None
        return grad_a.to(ctx.input_dtype), None, grad_c, None, None, None, None


class Gemms(Backend):
    """The transform by GEMMs in a's dtype, the mixes by the structure's torch ops in fp32: the plain torch
    backend, which serves every call (the last in the list). Subclasses may compute the mixes and
    reductions otherwise (mix, grad: ops/ runs a band's as Triton kernels on CUDA)."""

    name = "torch"

    def supports(self, call: Call) -> bool:
        return True

    def by_ops(self, call: Call) -> bool:
        return call.structure == "diagonal"  # four torch ops whose backward autograd runs in C++ (linear.py)

    def forward_pass(self, a, basis, coefficients, shift, structure: Structure, rows=False):
        """(out, P) by GEMMs: P = aB − c (N, r) in a's dtype; out = a + (P ⊙ g) Bᵀ = a + P (B diag(g))ᵀ (g
        folded into the basis), or a + (P Mᵀ) Bᵀ with the structure's mix summed in fp32; rows: each block
        of P mixed by its own coefficients (rows_mix)."""
        projection = a @ basis  # (N, r)
        if shift is not None:
            projection = projection - shift.to(a.dtype)
        if rows:
            mixed = self.rows_mix(
                structure, by_block(projection, coefficients), coefficients, transposed=True
            )
            return torch.addmm(a, mixed.view_as(projection), basis.T), projection
        if structure.elementwise:
            return torch.addmm(a, projection, scaled_basis(basis, coefficients).T), projection
        mixed = self.mix(structure, projection, coefficients, transposed=True).to(a.dtype)  # P Mᵀ
        return torch.addmm(a, mixed, basis.T), projection

    def backward_pass(self, grad, basis, coefficients, saved, structure: Structure, rows=False):
        """(da, dC) with Q = dout B: da = dout + (Q M) Bᵀ (for g: (Q ⊙ g) Bᵀ), the GEMM adding onto dout;
        dC = the structure's gradient of Σ (P Mᵀ) ⊙ Q (for g: Σ_rows Q ⊙ P; rows: each block's own)."""
        basis = basis.to(grad.dtype)
        along = grad @ basis  # Q (N, r)
        if rows:
            blocks = by_block(along, coefficients)  # (B, N / B, r)
            back = self.rows_mix(structure, blocks, coefficients, transposed=False)  # Q M, per block
            grad_a = torch.addmm(grad, back.view_as(along), basis.T)
            return grad_a, self.rows_grad(structure, blocks, by_block(saved, coefficients), coefficients)
        if structure.elementwise:
            grad_a = torch.addmm(grad, along, scaled_basis(basis, coefficients).T)
        else:
            back = self.mix(structure, along, coefficients, transposed=False).to(grad.dtype)  # Q M
            grad_a = torch.addmm(grad, back, basis.T)
        return grad_a, self.grad(structure, along, saved, coefficients)

    def rows_mix(self, structure: Structure, p, coefficients, transposed: bool):
        """P's blocks (B, N / B, r) each mixed by its own coefficients, in p's dtype: a diagonal's g rounded
        to it first (as scaled_basis rounds the one g), another structure's mix summed in fp32."""
        if structure.elementwise:
            return p * coefficients.to(p.dtype)[:, None, :]
        return structure.mix(p, coefficients, transposed).to(p.dtype)

    def rows_grad(self, structure: Structure, q, p, coefficients):
        """dC (B, *shape) in fp32 at least for coefficients per block, q and p as blocks (B, N / B, r): the
        gradient of ⟨Q, mix(P, C)⟩ in each block's C. A diagonal's is Σ over the block's rows of Q ⊙ P; any
        other structure's is its mix's vector-Jacobian product (exact, whatever the structure)."""
        if structure.elementwise:  # the products in q's dtype, summed in fp32 at least
            return (q * p.to(q.dtype)).sum(dim=1, dtype=torch.promote_types(q.dtype, torch.float32))
        q, p = wide(q, p)
        with torch.enable_grad():
            c = coefficients.detach().to(p.dtype).requires_grad_()
            mixed = structure.mix(p, c, transposed=True)
            return torch.autograd.grad(mixed, c, q.to(mixed.dtype))[0]

    def mix(self, structure: Structure, p, coefficients, transposed: bool):
        """P Mᵀ (transposed) or P M in fp32: the structure's own."""
        return structure.mix(p, coefficients, transposed)

    def grad(self, structure: Structure, q, p, coefficients):
        """dC in fp32: the structure's own; a diagonal's Σ_rows q ⊙ p by one small GEMM when r is small."""
        if structure.elementwise and q.shape[1] <= SMALL_RANK:
            return torch.mm(q.T, p).diagonal()
        return structure.grad(q, p, coefficients)


GEMMS = Gemms()
register(GEMMS, last=True)


def by_block(p: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """P (N, r) as (B, N / B, r): one block per set of coefficients."""
    return p.view(len(coefficients), -1, p.shape[-1])


def scaled_basis(basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B diag(g) (d, r) in the basis' dtype: g is rounded to it first, so no (d, r) fp32 copy is made (a
    bf16 basis times a bf16 g differs from the fp32 product by one more rounding, ~2⁻⁹ relative)."""
    return basis * g.to(basis.dtype)


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
