"""SpectralLinear: a frozen base layer adapted along its singular directions.

    W' = U diag(σ + δ) Vᵀ,   δ = 0 outside the selection S

computed in the one-sided form (see transform.py): the layer stores ONE basis, of its smaller
side (V_S, in × R, when in ≤ out; else U_S, out × R), never a copy of W. Several adapters may live
in one layer, keyed by name, one active at a time; each trains a vector over its own selection,
a subset of the R stored directions, read through its update rule (updates.py): a vector g, or for
the band structure (structures.py) the diagonals of a banded M. Everything an adapter trains is named
`sigma_adapters.*`.

A mixed batch (each row its own adapter) reaches the layer through one seam, serve_rows(): whoever
serves it (serving/bank.py) hands over one row of scales per batch row and takes it back after.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import transform as F
from .backends import NOTHING_DISABLED
from .linear import adapted_linear
from .structures.band import half_width, spread_plan
from .structures.base import Structure
from .structures.diagonal import Diagonal
from .structures.registry import structure_of
from .svd import Spectrum, side_for
from .updates import update_rule
from .weights import (
    bias_of,
    compute_dtype,
    dense_weight,
    dequantized_weight,
    is_quantized,
    linear_shape,
    weight_device,
    write_dense_weight,
)


class SigmaVector(nn.Module):
    """One adapter's trained tensor in one layer and its structure (structures/), and where its entries sit
    in the layer's basis: `vector` is (r,) for the diagonal structure, the 2b+1 diagonals (2b+1, r) of M for
    a band, M (r, r) for a dense core."""

    def __init__(
        self,
        indices: torch.Tensor,
        update: str,
        init: str,
        init_std: float,
        dtype: torch.dtype,
        structure: Structure | None = None,
    ):
        super().__init__()
        self.structure = structure or Diagonal()
        self.rule = update_rule(update)  # what the vector holds: δ (additive) or g (multiplicative)
        self.structure.check_rule(self.rule)
        # M = 0: the adapted layer equals the base
        vector = torch.zeros(self.structure.shape(len(indices)), dtype=dtype, device=indices.device)
        if init == "normal":
            vector.normal_(0.0, init_std)
            vector.copy_(self.structure.initial(vector))
        self.vector = nn.Parameter(vector)
        self.register_buffer("indices", indices, persistent=False)  # (r,) singular-value indices
        self.register_buffer("positions", None, persistent=False)  # (r,) columns of the basis; None = all
        self._plan = None  # (positions, spread_plan) of a band, for the positions it was computed for

    def spread(self, coefficients: torch.Tensor, stored: int) -> torch.Tensor:
        """This adapter's coefficients over all `stored` columns (Structure.spread); a band's plan is worked
        out once for the current positions."""
        if self.positions is None or self.structure.name != "band":
            return self.structure.spread(coefficients, self.positions, stored)
        if self._plan is None or self._plan[0] is not self.positions:
            self._plan = (self.positions, spread_plan(self.positions, half_width(coefficients), stored))
        return self.structure.spread(coefficients, self.positions, stored, self._plan[1])

    def extra_repr(self) -> str:
        return f"r={len(self.indices)}, update={self.rule.name}, structure={self.structure!r}"


class SpectralLinear(nn.Module):
    """Wraps a linear base layer (never copies or subclasses it) and adapts it on one side."""

    def __init__(self, base_layer: nn.Module, spectrum: Spectrum, dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.side = side_for(self.out_features, self.in_features)
        self.sigma_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._row_scales = None  # (B, R) scales or a server while serve_rows() serves a mixed batch
        self._quantized_base: nn.Module | None = None  # the quantized original while merged into a dense copy
        self.disabled_kernels: frozenset[str] = (
            NOTHING_DISABLED  # fast paths its model turned off (ops/switches)
        )
        self._set_spectrum(spectrum, dtype or compute_dtype(base_layer))

    # ---- adapters ----------------------------------------------------------------------------------

    @property
    def stored_rank(self) -> int:
        """R: the directions the layer stores (its adapters' r are each at most R)."""
        return self.sigma_basis.shape[1]

    def add_adapter(
        self,
        name: str,
        indices: list[int],
        update: str,
        init: str = "zeros",
        init_std: float = 0.0,
        structure: Structure | None = None,
    ):
        """A new adapter training a vector (or, for a band, its diagonals) over the given singular-value
        indices (all stored here)."""
        if name in self.sigma_adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer; delete it first")
        wanted = sorted(indices)
        index = torch.tensor(wanted, dtype=torch.int64, device=self.sigma_indices.device)
        dtype = self.sigma_values.dtype  # fp32, fp64 for fp64
        adapter = SigmaVector(index, update, init, init_std, dtype, structure)
        adapter.positions = self.positions_for(wanted)
        self.sigma_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            raise ValueError(
                f"adapter {name!r} is merged into the base weight; unmerge it before deleting it"
            )
        del self.sigma_adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make one adapter active (None = none: the layer computes the base layer alone)."""
        if name is not None and name not in self.sigma_adapters:
            raise KeyError(f"no adapter {name!r} in this layer (have: {list(self.sigma_adapters)})")
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise ValueError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before switching"
            )
        self.active_adapter = name

    def extend_spectrum(self, spectrum: Spectrum) -> None:
        """Replace the stored basis by a larger one that holds every direction in use (adapters remap)."""
        if self.merged_adapter is not None:
            raise ValueError("unmerge() before changing the basis of a merged layer")
        if not set(self.stored_indices) <= set(spectrum.indices.tolist()):
            raise ValueError("the new basis must contain every singular direction already stored")
        self._set_spectrum(spectrum, self.sigma_basis.dtype)
        for adapter in self.sigma_adapters.values():
            adapter.positions = self.positions_for(adapter.indices.tolist())

    def scales_for(
        self, indices: list[int], vector: torch.Tensor, update: str, structure: Structure | None = None
    ) -> torch.Tensor:
        """The coefficients over all R stored directions (g (R,), a band (2w+1, R), M (R, R)) of a trained
        tensor of `structure` (default the diagonal) over the given (stored) singular-value indices, read
        with the update rule named `update`."""
        positions = self.positions_for(sorted(indices))
        g = update_rule(update).scales(vector.to(self.sigma_values.device), self.sigma_at(positions))
        return (structure or Diagonal()).spread(g, positions, self.stored_rank)

    def columns(self, name: str) -> torch.Tensor | slice:
        """Columns of the stored basis that an adapter trains (an index tensor, or all of them)."""
        positions = self.sigma_adapters[name].positions
        return slice(None) if positions is None else positions

    def scales(self, name: str) -> torch.Tensor:
        """The adapter's coefficients over all R stored directions (fp32), zero where it trains nothing: g
        (R,), a band's diagonals over the stored columns (2w+1, R), or M (R, R)."""
        adapter = self.sigma_adapters[name]
        return adapter.spread(self._own_scales(adapter), self.stored_rank)

    def own_scales(self, name: str) -> torch.Tensor:
        """The adapter's coefficients over its own directions, in σ order (g (r,), a band (2b+1, r), M)."""
        return self._own_scales(self.sigma_adapters[name])

    def _own_scales(self, adapter: SigmaVector) -> torch.Tensor:
        return adapter.rule.scales(adapter.vector, self.sigma_at(adapter.positions))

    def sigma_at(self, positions: torch.Tensor | None) -> torch.Tensor:
        """σ at stored columns `positions` (None = all of them, in order)."""
        return self.sigma_values if positions is None else self.sigma_values[positions]

    # ---- forward -------------------------------------------------------------------------------------

    def serve_rows(self, rows) -> None:
        """Serve a mixed batch: until serve_rows(None), leading row b of every input (a batch row; a
        token, for a flat (N, d) input) computes with its own g over the R stored directions, whatever
        adapter is active. rows is either the scales, (B, R) — or bands (B, 2w+1, R) — fp32 (a row of
        zeros is the base layer), or a callable server(layer, x) that computes the layer's output itself
        (an AdapterBank's MixedBatch, which gathers from its tables). A merged layer refuses to serve."""
        self._row_scales = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._row_scales is not None:  # a mixed batch: each row its own adapter
            if self.merged_adapter is not None:
                raise ValueError(
                    "unmerge() before serving a mixed batch: the base weight holds a merged adapter"
                )
            if callable(self._row_scales):
                return self._row_scales(self, x)
            return self.forward_rows(x, self._row_scales)
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        base, basis, off = self.base_layer, self.sigma_basis, self.disabled_kernels
        structure = self.sigma_adapters[name].structure
        c = self.scales(name)  # g (R,), a band (2w+1, R), M (R, R)
        out = adapted_linear(x, base, basis, c, self.side == "input", off, structure)  # eager: one node
        if out is not None:
            return out
        if self.side == "input":
            return base(F.adapt_input(x, basis, c, off, structure))
        return F.adapt_output(base(x), bias_of(base), basis, c, off, structure)

    def forward_rows(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        structure: Structure | None = None,
        disabled: frozenset[str] = frozenset(),
    ) -> torch.Tensor:
        """The layer on a mixed batch (transform_rows: the chosen backend's per-row passes): leading row b of x
        with the coefficients rows[b] of `structure` (default: g (B, R), or bands (B, 2w+1, R), by their
        dimension: a serving table's). `disabled`: kernels turned off besides the layer's own."""
        structure = structure or (Diagonal() if rows.dim() == 2 else structure_of("band", half_width(rows)))
        basis, off = self.sigma_basis, self.disabled_kernels | disabled
        if self.side == "input":
            return self.base_layer(F.transform_rows(x, basis, rows, None, structure, off))
        shift = F.output_shift(bias_of(self.base_layer), basis)
        return F.transform_rows(self.base_layer(x), basis, rows, shift, structure, off)

    @torch.no_grad()
    def lora_factors(
        self, name: str, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r × in), B (out × r)) in fp32 with B A = the adapter's ΔW = U_S diag(δ_S) V_Sᵀ, exactly:

        input side:  ΔW = W V M Vᵀ   → B = W V M, A = Vᵀ          (M = diag(g), or the band)
        output side: ΔW = U M Uᵀ W   → B = U,     A = M Uᵀ W
        The side not stored comes from W: the layer's own weight, or `weight` (out, in) when given.
        """
        columns = self.columns(name)
        structure = self.sigma_adapters[name].structure
        m = structure.to_dense(self.own_scales(name).detach().double())  # (r, r)
        basis = self.sigma_basis[:, columns].double()  # (d, r)
        weight = (
            (dequantized_weight(self.base_layer) if weight is None else weight).detach().to(basis)
        )  # (out, in)
        if self.side == "input":
            return basis.T.float(), ((weight @ basis) @ m).float()
        return (m @ (basis.T @ weight)).float(), basis.float()

    @torch.no_grad()
    def singular_vectors(
        self, k: int, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (out × k), V (in × k)) of the first k stored directions; the side not stored is W V / σ or Wᵀ U / σ."""
        basis, sigma = self.sigma_basis[:, :k].double(), self.sigma_values[:k].double()
        weight = (dequantized_weight(self.base_layer) if weight is None else weight).detach().to(basis)
        if self.side == "input":
            return (weight @ basis) / sigma, basis
        return basis, (weight.T @ basis) / sigma

    # ---- merge -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + U_S diag(δ_S) V_Sᵀ for the active adapter. A second merge changes nothing."""
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        structure = self.sigma_adapters[self.active_adapter].structure
        g = self.scales(self.active_adapter).detach().clone()  # g (R,), or M dense (R, R)
        g = g if structure.elementwise else structure.to_dense(g)
        self._rewrite_weight(g)
        self.register_buffer("_merged_scales", g, persistent=False)
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() exactly (up to rounding in the weight's dtype); nothing happens if not merged."""
        if self.merged_adapter is None:
            return
        if self._quantized_base is not None:  # the quantized original comes back as it was
            self.base_layer, self._quantized_base = self._quantized_base, None
        else:
            self._rewrite_weight(F.inverse_scales(self._merged_scales))
        del self._merged_scales
        self.merged_adapter = None

    def _rewrite_weight(self, g: torch.Tensor) -> None:
        if is_quantized(self.base_layer):  # dequantize → merge → a dense layer (the original is kept)
            warnings.warn(
                f"merging into a quantized {type(self.base_layer).__name__}: the merged layer is dense, from the "
                "dequantized weight (the quantization error stays in it); re-quantize it if you need it small",
                stacklevel=4,
            )
            weight = dequantized_weight(self.base_layer).detach()
            merged = F.apply_to_weight(weight.float(), self.sigma_basis, g, self.side)
            self._quantized_base, self.base_layer = self.base_layer, _dense_linear(self.base_layer, merged)
            return
        weight = dense_weight(self.base_layer)
        wide = torch.promote_types(weight.dtype, torch.float32)
        write_dense_weight(
            self.base_layer, F.apply_to_weight(weight.to(wide), self.sigma_basis, g, self.side)
        )

    # ---- internals -------------------------------------------------------------------------------------

    def _set_spectrum(self, spectrum: Spectrum, dtype: torch.dtype) -> None:
        device = weight_device(self.base_layer)
        basis = spectrum.basis.to(device, dtype).contiguous()  # (d, R), row-major: the kernels read it so
        self.register_buffer("sigma_basis", basis, persistent=False)
        wide = torch.promote_types(spectrum.sigma.dtype, torch.float32)
        self.register_buffer("sigma_values", spectrum.sigma.to(device, wide), persistent=False)  # (R,)
        self.register_buffer("sigma_indices", spectrum.indices.to(device), persistent=False)  # (R,)
        self.stored_indices = tuple(spectrum.indices.tolist())  # the same, on the host: no device syncs
        self.register_buffer("sigma_max", spectrum.sigma_max.to(device, wide), persistent=False)  # ()

    def positions_for(self, wanted: list[int]) -> torch.Tensor | None:
        """Columns of the stored basis holding these singular-value indices (None = all, in order)."""
        if tuple(wanted) == self.stored_indices:
            return None
        column = {index: position for position, index in enumerate(self.stored_indices)}
        missing = [i for i in wanted if i not in column]
        if missing:
            raise ValueError(f"singular directions {missing[:5]} are not stored in this layer")
        return torch.tensor([column[i] for i in wanted], dtype=torch.int64, device=self.sigma_indices.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, side={self.side}, "
            f"stored_rank={self.stored_rank}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"
        )


def unwrapped(layer: nn.Module) -> nn.Module:
    """The base layer inside a SpectralLinear (any other module as it is)."""
    return layer.base_layer if isinstance(layer, SpectralLinear) else layer


def _dense_linear(quantized: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain nn.Linear holding weight (out, in) and the quantized layer's bias, in its compute dtype."""
    out_features, in_features = weight.shape
    bias = bias_of(quantized)
    dtype = compute_dtype(quantized)
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)
