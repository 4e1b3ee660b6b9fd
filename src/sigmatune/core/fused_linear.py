"""An adapted plain nn.Linear as ONE autograd node in eager mode: the fused transform and the base GEMM
together, forward and backward.

    input side:   y = (x + ((x B) ⊙ g) Bᵀ) Wᵀ + b                         P = x B
    output side:  z = x Wᵀ;  y = z + b + ((z U) ⊙ g) Uᵀ                     P = (z + b) U − c,  c = b U
    (a band: ⊙ g becomes the mix by Mᵀ, as in functional.transform)

Backward, with Q the kernel's projection of the incoming gradient:
    input side:   dx̃ = dy W;   (dx, dg) = kernels.transform(dx̃, B, g, saved=P)
    output side:  (dz, dg) = kernels.transform(dy, U, g, saved=P);   dx = dz W

This is functional.transform followed (or preceded) by the base layer, computed by the same kernel and the
same GEMM; what it saves is host time. Eager training of a model with hundreds of adapted layers is bound by
the host issuing kernels (benchmarks/README.md): one autograd.Function per layer instead of the transform's
Function plus the Linear's own node, no module call, no reshapes around it. It serves only what it can
serve exactly: a plain nn.Linear (not a subclass: quantized layers dequantize inside their forward) whose
weight is a plain tensor that needs no gradient, with no hooks on the layer or on every module (they would
not run), on CUDA with the fused kernel, not under autocast or torch.compile (whose path is transform_op's
Triton op, which inductor launches itself); everything else takes the generic path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from . import functional, kernels
from .structures import half_width

_PLAIN = (torch.Tensor, nn.Parameter)  # a weight's types; not a DTensor shard or a quantized subclass


def serves(base: nn.Module, x: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor) -> bool:
    """Whether adapted_linear computes this call of the adapted layer (else the generic path does)."""
    if type(base) is not nn.Linear or torch.compiler.is_compiling():
        return False
    weight, bias = base.weight, base.bias
    return (
        type(weight) in _PLAIN
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and x.dtype == weight.dtype == basis.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and not _hooked(base)
        and kernels.available(x, basis.shape[1], half_width(coefficients))
    )


def adapted_linear(
    x: torch.Tensor, base: nn.Linear, basis: torch.Tensor, coefficients: torch.Tensor, input_side: bool
) -> torch.Tensor:
    """The adapted layer's output for x (…, in): see the module docstring; differentiable in x and g (or C)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    out = _AdaptedLinear.apply(flat, base.weight, base.bias, basis, coefficients, input_side)  # (N, out)
    return out.view(*x.shape[:-1], out.shape[-1])


class _AdaptedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, basis, coefficients, input_side):
        ctx.input_side = input_side
        if input_side:
            adapted, projection, _ = kernels.transform(x, basis, coefficients, transposed=True)  # x̃, P
            out = torch.nn.functional.linear(adapted, weight, bias)
        else:
            shift = functional.output_shift(bias, basis)  # c = b U (r,)
            linear = torch.nn.functional.linear(x, weight, bias)
            out, projection, _ = kernels.transform(linear, basis, coefficients, shift, transposed=True)
        ctx.save_for_backward(projection, weight, basis, coefficients)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        projection, weight, basis, coefficients = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.input_side:
            grad_x, _, grad_c = kernels.transform(grad_out.mm(weight), basis, coefficients, saved=projection)
        else:
            grad_z, _, grad_c = kernels.transform(grad_out, basis, coefficients, saved=projection)
            grad_x = grad_z.mm(weight) if ctx.needs_input_grad[0] else None
        grad_c = grad_c.to(coefficients.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_c, None


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
