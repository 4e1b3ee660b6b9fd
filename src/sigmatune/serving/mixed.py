"""MixedBatch: one forward of a mixed-adapter batch through a bank's layers, on the fastest path there is.

AdapterBank.serving(ids) hands every SpectralLinear a server (layer.serve_rows) that calls back here with
the layer's input x. Where the mixed-batch kernel serves the call (CUDA, a table of vectors with r ≤ 128,
no gradient, not compiling: a served prefill or decode step) it computes

    input side:  base(x + ((x V_S) ⊙ G[ids]) V_Sᵀ)      output side:  y + (((y − b) U_S) ⊙ G[ids]) U_Sᵀ

with each row's g gathered from the bank's table G inside the kernel (ops/rows_kernel.fused_transform_rows); anything
else (CPU, full-spectrum or banded tables, training through a bank) takes the torch ops with one gather
per layer (SpectralLinear.forward_rows).

A decode step is bound by how many kernels it launches, so layers that read the same input — q, k and v
after one norm; gate and up — share one launch: the first of them computes every member's transformed
input and the others take theirs when called with that same tensor (checked by identity; a member called
with anything else computes alone). Which layers read the same input is declared by their names
(SHARED_INPUTS, as vLLM's packed modules are); for a model whose names match none, it is learned from the
first forward the kernel serves (runs of consecutive calls with one tensor object, at most three to a
launch), and the
members of a group compute on their input side: an output-side member (k, v: in > out) uses
V_S = Wᵀ U_S / σ_S, the same W' = (I + U_S diag(g) U_Sᵀ) W = W (I + V_S diag(g) V_Sᵀ) (exact singular
vectors; to the SVD's precision otherwise).

Once the groups are learned, a group whose first layer is a plain nn.Linear has its projections folded
into that layer's GEMM (folded.py): its base GEMM returns the rows' projections with its output (and with
k's and v's outputs after q's: their weights folded in too; gate's group, wider out than in, gets its
projections alone), and one launch with no reduction (ops/fold_kernel.expand_rows) adds those layers'
updates and computes the others' inputs (gate's and up's). The learning forward, and a forward captured
into a CUDA graph before a fold exists, take the launch above.
"""

from __future__ import annotations

import functools

import torch

from ..core import transform as F
from ..core.layer import SpectralLinear
from ..core.weights import bias_of
from .folded import Folds
from .ops import fold_kernel, rows_kernel

MEMBERS = 3  # layers one launch serves at most
SHARED_INPUTS = (  # sibling layers (one parent module) that read one input, in the order they are called
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi-3's unfused kin, OPT, ...
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),  # BERT and its kin
    ("w1", "w3"),  # Mixtral's experts
)


def declared_groups(names) -> dict[str, tuple[str, ...]] | None:
    """Layer → its group, for the layers whose names SHARED_INPUTS declares (None where none match)."""
    leaves: dict[str, set[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        leaves.setdefault(parent, set()).add(leaf)
    groups = {}
    for parent, present in leaves.items():
        for members in SHARED_INPUTS:
            if set(members) <= present:
                group = tuple(f"{parent}.{m}" if parent else m for m in members)
                groups.update(dict.fromkeys(group, group))
    return groups or None


class SharedInputs:
    """Which of a bank's layers read the same input (declared by their names, else learned once), and the
    input-side bases they share a launch with."""

    def __init__(self, names=()):
        self.groups: dict[str, tuple[str, ...]] | None = declared_groups(names)  # None: to be learned
        self._bases: dict[tuple[str, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._runs: list[list[str]] = []
        self._last: torch.Tensor | None = (
            None  # the input of the last recorded call (kept alive: no id reuse)
        )

    def record(self, name: str, x: torch.Tensor) -> None:
        """Note a fused call while learning: a call with the previous call's tensor joins its run."""
        if self._last is x:
            self._runs[-1].append(name)
        else:
            self._runs.append([name])
            self._last = x

    def learn(self) -> None:
        """Fix the groups from the recorded runs (once a forward has recorded any)."""
        if self.groups is not None or not self._runs:
            return
        groups = {}
        for run in self._runs:
            for start in range(0, len(run), MEMBERS):
                group = tuple(run[start : start + MEMBERS])
                groups.update(dict.fromkeys(group, group))
        self.groups, self._runs, self._last = groups, [], None

    def input_basis(self, name: str, layer: SpectralLinear, dtype: torch.dtype) -> torch.Tensor:
        """V_S (in, R) in `dtype`: the stored basis of an input-side layer, Wᵀ U_S / σ_S for an output-side
        one (computed once, in fp64)."""
        if layer.side == "input":
            return self.stored_basis(name, layer, dtype)
        return self._cached(
            ("input", name, dtype), layer, lambda: layer.singular_vectors(layer.stored_rank)[1]
        )

    def stored_basis(self, name: str, layer: SpectralLinear, dtype: torch.dtype) -> torch.Tensor:
        """The layer's stored basis in `dtype` (a copy made once if it is stored in another)."""
        if layer.sigma_basis.dtype == dtype:
            return layer.sigma_basis
        return self._cached(("stored", name, dtype), layer, lambda: layer.sigma_basis)

    def _cached(self, key, layer: SpectralLinear, make) -> torch.Tensor:
        """make() in key's dtype, made again if the layer's basis was replaced since."""
        source, value = self._bases.get(key, (None, None))
        if source is not layer.sigma_basis:
            source, value = layer.sigma_basis, make().to(key[2]).contiguous()
            self._bases[key] = (source, value)
        return value


class MixedBatch:
    """The servers of one forward: layer name → a callable(layer, x) handed to that layer."""

    def __init__(
        self,
        layers: dict[str, SpectralLinear],
        tables: dict[str, torch.Tensor],
        ids: torch.Tensor,
        shared: SharedInputs,
        folds: Folds,
        disabled: frozenset[str] = frozenset(),
    ):
        self.layers, self.tables, self.ids, self.shared, self.folds = layers, tables, ids, shared, folds
        self.disabled = disabled  # kernels the bank turned off (ops/switches.py)
        self.folding = folds.on and fold_kernel.enabled(disabled)  # the bank folded (AdapterBank.fold)
        # member → (its input, its transformed input x̃ or, if `done`, its output)
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        # the input dtype, if the kernel served this forward while the groups were being learned
        self._learning: torch.dtype | None = None

    def server(self, name: str):
        return functools.partial(self.forward, name)

    def finish(self) -> None:
        """After the forward: learn the shared inputs if this was the first one the kernel served, and
        fold its groups (so that a CUDA graph captured next has its folds). The groups hold only layers the
        kernel served in this forward: those it recorded."""
        self._pending.clear()
        self.shared.learn()
        if self._learning is not None and self.shared.groups is not None and self.folding:
            for group in dict.fromkeys(self.shared.groups.values()):
                self.folds.get(group, self.layers, self.shared, self._learning)

    def forward(self, name: str, layer: SpectralLinear, x: torch.Tensor) -> torch.Tensor:
        table = self.tables[name]
        if not self._fused(x, table):
            return layer.forward_rows(x, table.index_select(0, self.ids), disabled=self.disabled)
        done = self._pending.pop(name, None)
        if done is not None and done[0] is x:  # a group's first member computed this one's input (or output)
            return done[1] if done[2] else layer.base_layer(done[1])
        groups = self.shared.groups
        if groups is None:
            self.shared.record(name, x)
            self._learning = x.dtype
        group = (name,) if groups is None else groups.get(name, (name,))
        if not (len(group) > 1 and group[0] == name and all(self._fused(x, self.tables[m]) for m in group)):
            group = (name,)
        tables = [self.tables[m] for m in group]
        fold = (
            None
            if groups is None or not self.folding
            else self.folds.get(group, self.layers, self.shared, x.dtype)
        )
        if fold is not None:
            outs, outputs = fold(x, tables, self.ids), fold.outputs  # the folded layers' outputs, then inputs
            first = outs[0] if outputs else layer.base_layer(outs[0])
        elif len(group) > 1:
            bases = [self.shared.input_basis(m, self.layers[m], x.dtype) for m in group]
            outs, outputs = (
                rows_kernel.fused_transform_rows(x, bases, tables, self.ids, disabled=self.disabled),
                0,
            )  # every member's input
            first = layer.base_layer(outs[0])
        else:
            return self._alone(name, layer, x, table)
        for m, out in enumerate(outs[1:], start=1):
            self._pending[group[m]] = (x, out, m < outputs)
        return first

    def _alone(self, name, layer: SpectralLinear, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        basis = self.shared.stored_basis(name, layer, x.dtype)
        if layer.side == "input":
            return layer.base_layer(
                rows_kernel.fused_transform_rows(x, [basis], [table], self.ids, disabled=self.disabled)[0]
            )
        y = layer.base_layer(x)
        shift = F.output_shift(bias_of(layer.base_layer), layer.sigma_basis)
        shifts = None if shift is None else [shift.float()]
        return rows_kernel.fused_transform_rows(
            y, [basis], [table], self.ids, shifts, disabled=self.disabled
        )[0]

    def _fused(self, x: torch.Tensor, table: torch.Tensor) -> bool:
        return (
            table.dim() == 2
            and rows_kernel.serves(x, table.shape[1], self.disabled)
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling()
        )
