"""Folded projections: a served layer's projection computed by a base GEMM (mixed.py's path on CUDA).

The mixed-batch transform of a layer needs every row's projection x Q before it can add the update. As a
kernel of its own that projection is a reduction over all of x's columns, which a decode step's few rows
make latency-bound. The base GEMM of the group's first layer reads x anyway: with that layer's weight
stored as [W_0; Q_0ᵀ; Q_1ᵀ; Q_2ᵀ] (the base layer's weight a view of its first e rows: no second copy of
W) it returns h = [x W_0ᵀ + b_0, x Q_0, x Q_1, x Q_2] for a few more output columns, and what is left is
one expansion launch (serving/ops/fold_kernel.expand_rows).

A layer's own output, input side W' = W (I + V diag(g) Vᵀ), output side W' = (I + U diag(g) Uᵀ) W:

    y' = x Wᵀ + b + ((x Q) ⊙ g) Pᵀ,    (Q, P) = (V, W V) on the input side, (Wᵀ U, U) on the output side

exact for any stored basis. The next members of the group that are plain nn.Linear layers no wider out
than in (k and v after q: 256 columns from 2,048 in the 1.1B Llama) have their weights folded in too,
[W_0; W_1; W_2; Q_0ᵀ; …], and the launch adds their updates to their own outputs: one GEMM for the group, and
an expansion as wide as their outputs instead of their inputs. The members after those (up after gate: its
output is wider than its input) take their transformed inputs x + ((x V_m) ⊙ g_m) V_mᵀ, with
SharedInputs.input_basis's V_m, as the unfolded launch gives them, and run their own GEMM. A folded
member's weight (and bias) is a view of the group's: they share storage (save the base model, if at all,
with transformers' save_pretrained, which handles shared tensors). A group can also fold its projections
alone: h = x [Q_0 Q_1 …], and every member takes its transformed input. gate's group does, gate being wider
out than in: its expansion writes gate's and up's inputs, 2 × 2,048 columns, instead of gate's output and
up's input, 5,632 + 2,048. A bank whose kernels exclude "fold" (ops/switches.py) folds nothing: the
projections then run in the mixed-batch kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.layer import SpectralLinear
from ..core.weights import is_quantized
from .ops import fold_kernel


@dataclass
class Fold:
    """One group's folded GEMM and its expansion: call it with the group's input."""

    members: tuple[str, ...]
    outputs: int  # the first `outputs` members have their weights folded: the fold returns their outputs
    weight: torch.Tensor  # (Σ e_m + Σ r_m, d): [W_0; …; Q_0ᵀ; Q_1ᵀ; …]; the layers' weights are views of it
    bias: torch.Tensor | None  # (Σ e_m + Σ r_m,): [b_0; …; 0] (zeros for a layer without one)
    expansions: list[torch.Tensor]  # P_m (e_m, r_m) for the folded members, then V_m (d, r_m)
    bases: tuple[torch.Tensor, ...]  # each member's stored basis it was made from
    stamps: tuple[tuple[int, int], ...]  # the folded weights' storage and version just after

    def __call__(self, x: torch.Tensor, tables: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
        """[the folded members' outputs, the other members' transformed inputs] for x (B, …, d)."""
        h = torch.nn.functional.linear(x, self.weight, self.bias)  # (B, …, Σ e_m + Σ r_m)
        return fold_kernel.expand_rows(h, x, self.expansions, tables, ids, outputs=self.outputs)


class Folds:
    """The bank's folds, one per group's first layer, made when first needed once the bank has folded
    (AdapterBank.fold; never while a CUDA graph is being captured: that forward takes the unfolded launch),
    and undone by unfold(), which gives every folded layer a weight of its own again."""

    def __init__(self):
        self._folds: dict[str, Fold] = {}
        self.on = False  # AdapterBank.fold() turns it on, unfold() off

    def get(self, group: tuple[str, ...], layers: dict[str, SpectralLinear], shared, dtype) -> Fold | None:
        """The fold of this group for inputs of `dtype`, or None where its first layer's GEMM cannot hold
        it (not a plain nn.Linear of that dtype, or no fold may be made now)."""
        if not self.on or not foldable(layers[group[0]].base_layer, dtype):
            return None
        fold = self._folds.get(group[0])
        if fold is None or fold.members != group or not current(fold, layers):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return None
            fold = self._folds[group[0]] = make_fold(group, layers, shared, dtype)
        return fold

    @torch.no_grad()
    def unfold(self, layers: dict[str, SpectralLinear]) -> None:
        """Every folded layer's weight (and bias) its own storage again, the same values; no fold left."""
        for fold in self._folds.values():
            for name in fold.members[: fold.outputs]:
                module = layers[name].base_layer
                module.weight.data = module.weight.data.clone()
                if module.bias is not None:
                    module.bias.data = module.bias.data.clone()
        self._folds.clear()
        self.on = False


def foldable(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether F.linear over a longer weight computes this layer: a plain, unhooked nn.Linear of `dtype`."""
    return (
        type(module) is torch.nn.Linear
        and not is_quantized(module)
        and module.weight.dtype == dtype
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def current(fold: Fold, layers: dict[str, SpectralLinear]) -> bool:
    """Whether the fold still holds what its layers do: a new basis, a write to a folded layer's weight
    (a merge, a new state dict) remakes it."""
    same = all(layers[m].sigma_basis is basis for m, basis in zip(fold.members, fold.bases, strict=True))
    stamps = tuple(stamp(layers[m].base_layer.weight) for m in fold.members[: fold.outputs])
    return same and stamps == fold.stamps


def stamp(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


@torch.no_grad()
def make_fold(group: tuple[str, ...], layers: dict[str, SpectralLinear], shared, dtype) -> Fold:
    """Fold the group's projections, and the weights of its first layers that can be (folded_outputs),
    into one weight, which those layers' weights become views of."""
    outputs = folded_outputs(group, layers, dtype)
    modules = [layers[m].base_layer for m in group[:outputs]]
    weights = [module.weight.detach() for module in modules]  # (e_m, d)
    pairs = [projection_pair(layers[m]) for m in group[:outputs]]  # (Q_m (d, r), P_m (e_m, r)), fp64
    inputs = [shared.input_basis(m, layers[m], dtype) for m in group[outputs:]]  # V_m (d, r_m)
    folded = torch.cat([*weights, *(q.T.to(dtype) for q, _ in pairs), *(v.T for v in inputs)])
    bias = None
    if any(module.bias is not None for module in modules):
        parts = [
            w.new_zeros(w.shape[0]) if m.bias is None else m.bias.detach()
            for m, w in zip(modules, weights, strict=True)
        ]
        bias = torch.cat([*parts, folded.new_zeros(folded.shape[0] - sum(w.shape[0] for w in weights))])
    start = 0
    for module, weight in zip(modules, weights, strict=True):  # the layers now read the folded storage
        module.weight.data = folded[start : start + weight.shape[0]]
        if module.bias is not None:
            module.bias.data = bias[start : start + weight.shape[0]]
        start += weight.shape[0]
    expansions = [p.to(dtype).contiguous() for _, p in pairs] + inputs
    bases = tuple(layers[m].sigma_basis for m in group)
    stamps = tuple(stamp(module.weight) for module in modules)
    return Fold(group, outputs, folded, bias, expansions, bases, stamps)


def folded_outputs(group: tuple[str, ...], layers: dict[str, SpectralLinear], dtype) -> int:
    """How many of the group's layers, from its first, have their weights folded (the fold returns their
    outputs, and the others' transformed inputs): the layers in a row that are foldable and no wider out
    than in, whose expansion then writes fewer columns than their transformed inputs would — q k v; o; down;
    none of gate's group, which folds its projections alone and expands gate's input and up's."""
    count = 0
    for name in group:
        module = layers[name].base_layer
        if not (module.out_features <= module.in_features and foldable(module, dtype)):
            break
        count += 1
    return count


def projection_pair(layer: SpectralLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q (d, r), P (e, r)) in fp64 with the layer's output x Wᵀ + b + ((x Q) ⊙ g) Pᵀ."""
    basis, wide = layer.sigma_basis.double(), layer.base_layer.weight.detach().double()
    if layer.side == "input":
        return basis, wide @ basis  # Q = V, P = W V
    return wide.T @ basis, basis  # Q = Wᵀ U, P = U
