"""Compression: an adapter over a few directions per layer that keeps most of a trained adapter's update.

Per layer the update in the singular basis is ΔW = U_S ΔΣ V_Sᵀ, with ΔΣ = diag(δ) for a diagonal
adapter, Σ_S M (input side) or M Σ_S (output side) for a band. Each direction i is scored by what it
carries, ‖row i of ΔΣ‖² + ‖column i of ΔΣ‖² (for a diagonal: 2 δ_i², i.e. |δ_i|), the R best are kept,
and the result is an ordinary adapter over those explicit indices: the diagonal's entries there, or
the band's entries among them (a band over the kept directions in σ order keeps all of them: kept
neighbours within b in the old order are within b in the new one). It trains nothing new, and
serves, merges and exports to LoRA at rank R. `kept` is ‖ΔW_kept‖_F / ‖ΔW‖_F per layer.

Functions of a SigmaModel (passed in), like exchange.py.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.structures import band_to_dense, dense_to_band, half_width


@dataclasses.dataclass
class Compression:
    """What compress() kept: per layer the share of ‖ΔW‖_F, and over all layers together."""

    layers: dict[str, float]  # layer → ‖ΔW_kept‖_F / ‖ΔW‖_F
    total: float  # sqrt(Σ ‖ΔW_kept‖²_F / Σ ‖ΔW‖²_F) over the layers
    rank: int

    def summary(self) -> str:
        worst = min(self.layers.items(), key=lambda item: item[1])
        return (
            f"kept {100 * self.total:.1f}% of the update's ‖ΔW‖_F at rank {self.rank} "
            f"({len(self.layers)} layers; the least kept: {worst[0]} {100 * worst[1]:.1f}%)"
        )


def compress(model, rank: int, adapter_name: str, new_name: str) -> Compression:
    """Add new_name: adapter_name kept to its `rank` largest directions per layer (all, where it has fewer)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"compress: rank must be a positive int, got {rank!r}")
    if adapter_name not in model.peft_config:
        raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    kept, values, shares = {}, {}, {}
    kept_norm = total_norm = 0.0
    for name, layer in model.spectral_layers().items():
        if adapter_name not in layer.sigma_adapters:
            continue
        adapter = layer.sigma_adapters[adapter_name]
        update = _singular_update(layer, adapter_name)  # ΔΣ (r, r) over the adapter's directions
        score = update.square().sum(dim=0) + update.square().sum(dim=1)  # (r,)
        chosen = sorted(torch.topk(score, min(rank, len(score))).indices.tolist())
        index = torch.tensor(chosen, device=update.device)
        kept[name] = [adapter.indices.tolist()[i] for i in chosen]
        values[name] = _restricted(adapter.vector.detach(), index)
        part, whole = float(update[index][:, index].square().sum()), float(update.square().sum())
        shares[name] = (part / whole) ** 0.5 if whole > 0 else 1.0
        kept_norm, total_norm = kept_norm + part, total_norm + whole
    compressed = dataclasses.replace(
        config, rank=rank, selection=kept, target_modules=list(kept), init="zeros", svd="exact"
    )
    model._add(new_name, compressed, kept, None, drop_small=False)
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            if name in values:
                layer.sigma_adapters[new_name].vector.copy_(values[name])
    total = (kept_norm / total_norm) ** 0.5 if total_norm > 0 else 1.0
    return Compression(shares, total, rank)


def _singular_update(layer, adapter_name: str) -> torch.Tensor:
    """ΔΣ (r, r): the update in the singular basis of the adapter's own directions."""
    adapter = layer.sigma_adapters[adapter_name]
    sigma = layer.sigma_at(adapter.positions).detach()
    scales = layer.own_scales(adapter_name).detach()
    if scales.dim() == 1:
        return torch.diag(adapter.rule.deltas(adapter.vector.detach(), sigma))  # diag(δ)
    matrix = band_to_dense(scales)
    return sigma[:, None] * matrix if layer.side == "input" else matrix * sigma[None, :]


def _restricted(vector: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The trained vector over the kept directions: entries of g or δ, or the band of M among them."""
    if vector.dim() == 1:
        return vector[index]
    matrix = band_to_dense(vector)[index][:, index]
    return dense_to_band(matrix, half_width(vector))
