"""The fused transform as torch.library Triton ops, so that torch.compile sees each direction as one node.

    sigmatune::transform(a, B, T, c, transposed)     → (out, P)     out = a + (aB − c) T Bᵀ,  P = aB − c
    sigmatune::transform_backward(dy, B, T, P)       → (dx, dT)     transform_kernel.fused_transform's backward pass

with the autograd formula registered (dx from the backward op, dT its coefficient gradient; B, c and the
flag get none). Dynamo records each op as one node (its graph is what a backend sees first); inductor then
lowers the op's body, so the compiled code allocates the outputs and launches the Triton kernel from its own
generated launcher — no Python of ours runs per layer and step (an opaque custom op ran transform_kernel.fused_transform's
Python on every call, which left a compiled step bound by the host). Compile regions (each decoder layer
compiled once for all of them: benchmarks/train_step.py) keep the compile short. Eager calls take
core/transform._Transform instead: the autograd formula registered here runs through a generated
autograd.Function behind the dispatcher, which costs more host time per layer than calling one directly
(benchmarks/layer_overhead.py).
"""

from __future__ import annotations

import torch

from . import transform_kernel as kernels


def _traced_launch(grid, arguments, constants, warps, stages) -> None:
    """Launch the transform kernel through torch.library.wrap_triton: eager calls go through the JIT, traced
    ones (make_fx, inductor) become a launch in the graph."""
    torch.library.wrap_triton(kernels._transform_kernel)[grid](
        *arguments, **constants, num_warps=warps, num_stages=stages
    )


# Triton's interpreter (CPU tests) gives wrap_triton no kernel to trace: there the ops stay opaque custom ops,
# their shapes from register_fake, as they are on a torch without triton_op (before 2.6) or without Triton
# (a CPU install: triton_op would warn on import that Triton is missing; the ops are never called there).
TRACEABLE = kernels.triton is not None and not kernels.INTERPRET and hasattr(torch.library, "triton_op")
_define = torch.library.triton_op if TRACEABLE else torch.library.custom_op
_LAUNCH = _traced_launch if TRACEABLE else None  # None: transform_kernel.fused_transform's cached launcher


@_define("sigmatune::transform", mutates_args=())
def transform_op(
    a: torch.Tensor,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, projection) of transform_kernel.fused_transform's forward pass: a (N, d), basis (d, r) in a's dtype."""
    out, projection, _ = kernels.fused_transform(
        a, basis, coefficients, shift, transposed=transposed, launch=_LAUNCH
    )
    return out, projection


@_define("sigmatune::transform_backward", mutates_args=())
def transform_backward_op(
    grad: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor, saved: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of a, grad of the coefficients in fp32) for the forward pass that saved `saved` (its P)."""
    grad_a, _, grad_c = kernels.fused_transform(grad, basis, coefficients, saved=saved, launch=_LAUNCH)
    return grad_a, grad_c.contiguous()  # a band's is a slice of the padded partial sums


if not TRACEABLE:

    @transform_op.register_fake
    def _(a, basis, coefficients, shift, transposed):
        width = kernels.padded_rank(basis.shape[1])
        return torch.empty_like(a), a.new_empty((a.shape[0], width), dtype=torch.float32)

    @transform_backward_op.register_fake
    def _(grad, basis, coefficients, saved):
        return torch.empty_like(grad), coefficients.new_empty(coefficients.shape, dtype=torch.float32)


def _save(ctx, inputs, output) -> None:
    _, basis, coefficients, _, _ = inputs
    ctx.save_for_backward(output[1], basis, coefficients)


def _backward(ctx, grad_out, grad_projection):
    projection, basis, coefficients = ctx.saved_tensors
    grad_a, grad_c = transform_backward_op(grad_out.contiguous(), basis, coefficients, projection)
    return grad_a, None, grad_c.to(coefficients.dtype), None, None


transform_op.register_autograd(_backward, setup_context=_save)
