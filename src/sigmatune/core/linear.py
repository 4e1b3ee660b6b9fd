"""An adapted plain nn.Linear in eager mode at the least host cost: eager training of a model with hundreds of
adapted layers is bound by the host issuing kernels (benchmarks/layer_overhead.py), so each call here is as few host
steps as the math allows.

    input side:   y = (x + ((x B) ⊙ g) Bᵀ) Wᵀ + b                         P = x B
    output side:  z = x Wᵀ;  y = z + b + ((z U) ⊙ g) Uᵀ                     P = (z + b) U − c,  c = b U
    (a band: ⊙ g becomes the mix by Mᵀ, as in transform.transform)

Two ways, the same math as transform.transform followed (or preceded) by the base layer:
- ONE autograd.Function for the transform and the base GEMM together, computed by a backend's forward_pass /
  backward_pass: the fused kernel (CUDA, r ≤ 128), or the GEMMs where it does not serve a band.
    input side:   dx̃ = dy W;   (dx, dg) = backward_pass(dx̃, P)
    output side:  (dz, dg) = backward_pass(dy, P);   dx = dz W
- a diagonal g the kernel does not serve (the full spectrum, the CPU): four torch ops (P = x B, P ⊙ g, an
  addmm, the linear), whose backward autograd runs in C++ with no Python: dx̃ = dy W, Q = dx̃ B,
  dg = Σ_rows Q ⊙ P, dx = dx̃ + (Q ⊙ g) Bᵀ. g is rounded to the compute dtype first (bf16: ~2⁻⁹ relative,
  as a bf16 base layer's own weight is), so P ⊙ g and dg are in that dtype. Autograd keeps P (N × r), g,
  the basis and W, as the Function does — but x in place of P for the full spectrum of an input-side
  layer on CUDA (keeps_input: the same size, often kept by a neighbour already, which lowers the peak
  memory of a step), recomputing P in backward.
Which the backend picks (Backend.by_ops): the four ops cost the host less than the Function on GEMMs (a
cuBLAS call costs the host about what a Triton launch does; benchmarks/layer_overhead.py), the fused kernel's
Function least.

Either serves only what it can serve exactly: a plain nn.Linear (not a subclass: quantized layers dequantize
inside their forward) whose weight is a plain tensor that needs no gradient, in the dtype of the input and
the basis, with no hooks on the layer or on every module (they would not run), not under autocast or
torch.compile (whose path is a backend's compiled op, which inductor launches itself); everything else
takes the generic path.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from .backends import NOTHING_DISABLED, Call, choose
from .structures.base import Structure
from .transform import DIAGONAL, output_shift

_PLAIN = (torch.Tensor, nn.Parameter)  # a weight's types; not a DTensor shard or a quantized subclass


def adapted_linear(
    x: torch.Tensor,
    base: nn.Module,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    input_side: bool,
    disabled: frozenset[str] = NOTHING_DISABLED,
    structure: Structure = DIAGONAL,
) -> torch.Tensor | None:
    """The adapted layer's output for x (…, in) as one autograd node (see the module docstring;
    differentiable in x and g, or C), or None where this path would not be exact: then the caller takes the
    generic path. Checked on every call, cheapest first (this is the per-layer host cost of eager training)."""
    if type(base) is not nn.Linear or torch.compiler.is_compiling():
        return None
    parameters = base._parameters  # weight, bias: read once, without nn.Module.__getattr__
    if "weight" not in parameters or "bias" not in parameters:  # kept elsewhere: the module's forward knows
        return None
    weight, bias = parameters["weight"], parameters["bias"]
    if (
        weight.requires_grad
        or x.dtype != weight.dtype
        or basis.dtype != weight.dtype
        or type(weight) not in _PLAIN
        or (bias is not None and bias.requires_grad)
        or _hooked(base)
        or torch.is_autocast_enabled(x.device.type)
    ):
        return None
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    # plain: neither autocast nor a trace, checked above
    call = Call.of(flat, basis, coefficients, structure, disabled, plain=True)
    backend = choose(call)
    if backend.by_ops(call):
        out = _diagonal_by_ops(flat, weight, bias, basis, coefficients, input_side)  # (N, out)
    else:
        out = _AdaptedLinear.apply(flat, weight, bias, basis, coefficients, input_side, backend, structure)
    return out.view(*x.shape[:-1], out.shape[-1])


def _diagonal_by_ops(x, weight, bias, basis, g, input_side: bool) -> torch.Tensor:
    """The adapted layer for a diagonal g by four torch ops (see the module docstring): x (N, in), basis
    (d, r) in x's dtype, g (r,) rounded to it; autograd saves P (N, r) — or x in its place, see
    keeps_input — g, the basis and W."""
    g = g.to(x.dtype)
    if input_side:
        projection = x @ basis  # P (N, r)
        # P ⊙ g, not B diag(g) as functional's GEMM path scales: autograd's dg is then Σ_rows Q ⊙ P, not
        # the d × r gradient of B diag(g) (one more N × d × r GEMM)
        with _kept_as_input(projection, x, basis):
            scaled = projection * g  # autograd keeps P for dg, or x in its place
        adapted = torch.addmm(x, scaled, basis.T)  # x̃ (N, in)
        return torch.nn.functional.linear(adapted, weight, bias)
    out = torch.nn.functional.linear(x, weight, bias)  # z + b (N, out)
    projection = out @ basis  # (z + b) U (N, r)
    if bias is not None:
        projection = projection - output_shift(bias, basis)  # − c: P = z U
    return torch.addmm(out, projection * g, basis.T)


def keeps_input(x: torch.Tensor, basis: torch.Tensor) -> bool:
    """Whether the ops keep x for backward in place of P = x B, recomputing P there (one more N × in × r
    GEMM): on CUDA, where memory is the limit (on the CPU compute is), when the basis is as wide as x (the
    full spectrum of an input-side layer, r = in), so x costs no more than P — and nothing at all where
    something else keeps the same x already (gate_proj and up_proj read one x, as square q, k and v do;
    o_proj reads the attention's output, which attention keeps). Not under saved-tensor hooks of someone
    else (activation checkpointing, offloading): those decide what is kept."""
    return (
        x.is_cuda
        and basis.shape[1] == x.shape[1]
        and torch.is_grad_enabled()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def _kept_as_input(projection: torch.Tensor, x: torch.Tensor, basis: torch.Tensor):
    """Where keeps_input: saved_tensors_hooks under which autograd keeps (x, B) where it would keep
    `projection` = x B, recomputing it when backward asks (every other saved tensor kept as it is);
    elsewhere a context that changes nothing."""
    if not keeps_input(x, basis):
        return contextlib.nullcontext()
    recomputed = _Recomputed(projection, x, basis)
    return torch.autograd.graph.saved_tensors_hooks(recomputed.pack, recomputed.unpack)


class _Recomputed:
    """What autograd keeps in place of P = x B: x and B."""

    def __init__(self, projection: torch.Tensor, x: torch.Tensor, basis: torch.Tensor):
        self.projection, self.x, self.basis = projection, x, basis

    def pack(self, tensor: torch.Tensor):
        if tensor is self.projection:
            self.projection = None  # from here on this object holds x and B, not P
            return self
        return tensor

    def unpack(self, saved):
        return saved.x @ saved.basis if isinstance(saved, _Recomputed) else saved


class _AdaptedLinear(torch.autograd.Function):
    """The transform's passes (by the chosen backend) and the base GEMM, forward and backward, in one node."""

    @staticmethod
    def forward(ctx, x, weight, bias, basis, coefficients, input_side, backend, structure):
        ctx.input_side, ctx.backend, ctx.structure = input_side, backend, structure
        if input_side:
            adapted, saved = backend.forward_pass(x, basis, coefficients, None, structure)  # x̃, P
            out = torch.nn.functional.linear(adapted, weight, bias)
        else:
            shift = output_shift(bias, basis)  # c = b U (r,)
            linear = torch.nn.functional.linear(x, weight, bias)
            out, saved = backend.forward_pass(linear, basis, coefficients, shift, structure)
        ctx.save_for_backward(saved, weight, basis, coefficients)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight, basis, coefficients = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.input_side:
            grad_x, grad_c = ctx.backend.backward_pass(
                grad_out.mm(weight), basis, coefficients, saved, ctx.structure
            )
        else:
            grad_z, grad_c = ctx.backend.backward_pass(grad_out, basis, coefficients, saved, ctx.structure)
            grad_x = grad_z.mm(weight) if ctx.needs_input_grad[0] else None
        grad_c = grad_c.to(coefficients.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_c, None, None, None


def _hooked(base: nn.Module) -> bool:
    """Whether a hook would run around base's forward: its own, or one registered for every module."""
    return bool(
        base._forward_hooks
        or base._forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
        or module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )
