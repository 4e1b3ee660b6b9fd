"""Folded projections: a served layer's projection computed by a base GEMM (mixed.py's path on CUDA).

The mixed-batch transform of a layer needs every row's projection x Q before it can add the update. As a
kernel of its own that projection is a reduction over all of x's columns, which a decode step's few rows
make latency-bound. The base GEMM of the group's first layer reads x anyway: with that layer's weight
stored as [W_0; Q_0ᵀ; Q_1ᵀ; Q_2ᵀ] (the base layer's weight a view of its first e rows: no second copy of
W) it returns h = [x W_0ᵀ + b_0, x Q_0, x Q_1, x Q_2] for a few more output columns, and what is left is
one expansion launch (core/fold_kernels.expand_rows).

The first layer's own output, input side W' = W (I + V diag(g) Vᵀ), output side W' = (I + U diag(g) Uᵀ) W:

    y' = x Wᵀ + b + ((x Q) ⊙ g) Pᵀ,    (Q, P) = (V, W V) on the input side, (Wᵀ U, U) on the output side

exact for any stored basis. The group's other layers take their transformed inputs
x + ((x V_m) ⊙ g_m) V_mᵀ, with SharedInputs.input_basis's V_m, as the unfolded launch gives them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core import fold_kernels
from ..core.layer import SpectralLinear
from ..core.weights import is_quantized

ENABLED = os.environ.get("SIGMATUNE_FOLDED", "1") != "0"  # =0: the projection in the mixed-batch kernel


@dataclass
class Fold:
    """One group's folded GEMM and its expansion: call it with the group's input."""

    members: tuple[str, ...]
    weight: torch.Tensor  # (e + Σ r_m, d): [W_0; Q_0ᵀ; Q_1ᵀ; …]; its first e rows are the base layer's weight
    bias: torch.Tensor | None  # (e + Σ r_m,): [b_0; 0], its first e the base layer's bias
    expansions: list[torch.Tensor]  # P_0 (e, r_0), then V_m (d, r_m)
    bases: tuple[torch.Tensor, ...]  # each member's stored basis it was made from
    stamp: tuple[int, int]  # the first weight's storage and version just after

    def __call__(self, x: torch.Tensor, tables: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
        """[the first layer's output, the other members' transformed inputs] for x (B, …, d)."""
        h = torch.nn.functional.linear(x, self.weight, self.bias)  # (B, …, e + Σ r_m)
        return fold_kernels.expand_rows(h, x, self.expansions, tables, ids)


class Folds:
    """The bank's folds, one per group's first layer, made when first needed (never while a CUDA graph is
    being captured: that forward takes the unfolded launch)."""

    def __init__(self):
        self._folds: dict[str, Fold] = {}

    def get(self, group: tuple[str, ...], layers: dict[str, SpectralLinear], shared, dtype) -> Fold | None:
        """The fold of this group for inputs of `dtype`, or None where its first layer's GEMM cannot hold
        it (not a plain nn.Linear of that dtype, or no fold may be made now)."""
        if not ENABLED or not foldable(layers[group[0]].base_layer, dtype):
            return None
        fold = self._folds.get(group[0])
        if fold is None or fold.members != group or not current(fold, layers):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return None
            fold = self._folds[group[0]] = make_fold(group, layers, shared, dtype)
        return fold


def foldable(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether F.linear over a longer weight computes this layer: a plain, unhooked nn.Linear of `dtype`."""
    return (
        type(module) is torch.nn.Linear
        and not is_quantized(module)
        and module.weight.dtype == dtype
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def current(fold: Fold, layers: dict[str, SpectralLinear]) -> bool:
    """Whether the fold still holds what its layers do: a new basis, or a write to the first layer's
    weight (a merge, a new state dict), remakes it."""
    same = all(layers[m].sigma_basis is basis for m, basis in zip(fold.members, fold.bases, strict=True))
    return same and stamp(layers[fold.members[0]].base_layer.weight) == fold.stamp


def stamp(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


@torch.no_grad()
def make_fold(group: tuple[str, ...], layers: dict[str, SpectralLinear], shared, dtype) -> Fold:
    """Fold the group's projections into its first layer's weight, which becomes a view of the result."""
    first = layers[group[0]]
    module = first.base_layer
    weight = module.weight.detach()  # (e, d)
    basis, wide = first.sigma_basis.double(), weight.double()
    if first.side == "input":
        projection, expansion = basis, wide @ basis  # Q = V (d, r), P = W V (e, r)
    else:
        projection, expansion = wide.T @ basis, basis  # Q = Wᵀ U (d, r), P = U (e, r)
    inputs = [shared.input_basis(m, layers[m], dtype) for m in group[1:]]  # V_m (d, r_m)
    folded = torch.cat([weight, projection.T.to(dtype), *(v.T for v in inputs)])
    bias = None
    if module.bias is not None:
        bias = torch.cat([module.bias.detach(), module.bias.new_zeros(folded.shape[0] - weight.shape[0])])
        module.bias.data = bias[: weight.shape[0]]
    module.weight.data = folded[: weight.shape[0]]  # the base layer now reads the folded storage
    expansions = [expansion.to(dtype).contiguous(), *inputs]
    bases = tuple(layers[m].sigma_basis for m in group)
    return Fold(group, folded, bias, expansions, bases, stamp(module.weight))
