"""The fused transform as torch.library custom ops, so that torch.compile sees each direction as one node.

    sigmatune::transform(a, B, T, c, transposed)     → (out, P)     out = a + (aB − c) T Bᵀ,  P = aB − c
    sigmatune::transform_backward(dy, B, T, P)       → (dx, dT)     kernels.transform's backward pass

with the autograd formula registered (dx from the backward op, dT its coefficient gradient; B, c and the
flag get none). Inductor calls the ops as they are (an extern kernel each) instead of tracing the Triton
kernel into every one of a model's hundreds of layers, which is what made a compile of the 1.1B shape take
minutes; their fake implementations give the shapes. Eager calls take functional._Transform instead: the
autograd formula registered here runs through a generated autograd.Function behind the dispatcher, which
costs more host time per layer than calling one directly (benchmarks/layer_overhead.py).
"""

from __future__ import annotations

import torch

from . import kernels


@torch.library.custom_op("sigmatune::transform", mutates_args=())
def transform(
    a: torch.Tensor,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, projection) of kernels.transform's forward pass: a (N, d), basis (d, r) in a's dtype."""
    out, projection, _ = kernels.transform(a, basis, coefficients, shift, transposed=transposed)
    return out, projection


@transform.register_fake
def _(a, basis, coefficients, shift, transposed):
    width = kernels.padded_rank(basis.shape[1])
    return torch.empty_like(a), a.new_empty((a.shape[0], width), dtype=torch.float32)


@torch.library.custom_op("sigmatune::transform_backward", mutates_args=())
def transform_backward(
    grad: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor, saved: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of a, grad of the coefficients in fp32) for the forward pass that saved `saved` (its P)."""
    grad_a, _, grad_c = kernels.transform(grad, basis, coefficients, saved=saved)
    return grad_a, grad_c.contiguous()  # a band's is a slice of the padded partial sums


@transform_backward.register_fake
def _(grad, basis, coefficients, saved):
    return torch.empty_like(grad), coefficients.new_empty(coefficients.shape, dtype=torch.float32)


def _save(ctx, inputs, output) -> None:
    _, basis, coefficients, _, _ = inputs
    ctx.save_for_backward(output[1], basis, coefficients)


def _backward(ctx, grad_out, grad_projection):
    projection, basis, coefficients = ctx.saved_tensors
    grad_a, grad_c = transform_backward(grad_out.contiguous(), basis, coefficients, projection)
    return grad_a, None, grad_c.to(coefficients.dtype), None, None


transform.register_autograd(_backward, setup_context=_save)
