"""Compression: an adapter over a few directions per layer that keeps most of a trained adapter's update.

Per layer the update in the singular basis is ΔW = U_S ΔΣ V_Sᵀ, with ΔΣ = diag(δ) for a diagonal
adapter, Σ_S M (input side) or M Σ_S (output side) for a band. Each direction i is scored by what it
carries, ‖row i of ΔΣ‖² + ‖column i of ΔΣ‖² (for a diagonal: 2 δ_i², i.e. |δ_i|), the R best are kept,
and the result is an ordinary adapter over those explicit indices: the diagonal's entries there, or
the band's entries among them (a band over the kept directions in σ order keeps all of them: kept
neighbours within b in the old order are within b in the new one). It trains nothing new, and
serves, merges and exports to LoRA at rank R. `kept` is ‖ΔW_kept‖_F / ‖ΔW‖_F per layer.

With calibration data the directions are weighed by what they do to the layer's output on it: the
error of dropping a set D is E‖ΔW_D x‖² = E‖ΔΣ_D z‖² with z = Vᵀx, which for a diagonal is
Σ_{i∈D} δ_i² c_i, c_i = E[z_i²] (exact: the diagonal has no cross terms), so ΔΣ is scored as
ΔΣ diag(√c) (for a band this leaves out z's cross-covariance). Directions the data hardly excites
then give way to ones it does; `kept` is then the share of the output's ‖ΔW x‖ on the data (for a band
the share of the truncated M, before the refit below lowers the error further). The second moments come
from hooks on the layers while the model runs the given batches: an input-side layer projects its input,
z = x V; an output-side one its base layer's output y = W x + b, z = Uᵀ(y − b) / σ.

A calibrated band is then refitted to the data rather than truncated. Rows of ΔΣ are output directions,
so the error separates by row: E‖(ΔΣ − ΔΣ') z‖² = Σ_i (a_i − a'_i)ᵀ C (a_i − a'_i) with a_i row i of ΔΣ
and C = E[z zᵀ]. A kept row i may use the columns J_i of its band among the kept directions (in their
σ order), and its best coefficients there are the least-squares ones, a'_J = C_JJ⁻¹ C_J,: a_i: they
take over, through z's correlations, what the dropped neighbours did. Truncation is one choice of a'_J,
so the refit's error on the data is never larger; at full rank it returns M itself. C is needed only
over T = the kept directions and their rows' supports (a second pass over the batches, |T| ≤ R(2b+1)).

Functions of a SigmaModel (passed in), like exchange.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..core.progress import Progress
from ..core.structures.band import dense_to_band, half_width
from ..core.weights import bias_of


@dataclasses.dataclass
class Compression:
    """What compress() kept: per layer the share of ‖ΔW‖_F, and over all layers together."""

    layers: dict[str, float]  # layer → ‖ΔW_kept‖_F / ‖ΔW‖_F (calibrated: of ‖ΔW x‖ on the data)
    total: float  # sqrt(Σ ‖ΔW_kept‖²_F / Σ ‖ΔW‖²_F) over the layers
    rank: int
    calibrated: bool = False  # weighed by calibration data

    def summary(self) -> str:
        worst = min(self.layers.items(), key=lambda item: item[1])
        measure = "output ‖ΔW x‖ on the calibration data" if self.calibrated else "‖ΔW‖_F"
        return (
            f"kept {100 * self.total:.1f}% of the update's {measure} at rank {self.rank} "
            f"({len(self.layers)} layers; the least kept: {worst[0]} {100 * worst[1]:.1f}%)"
        )


def compress(model, rank: int, adapter_name: str, new_name: str, calibration=None) -> Compression:
    """Add new_name: adapter_name kept to its `rank` largest directions per layer (all, where it has fewer);
    with `calibration` (model inputs: see activation_moments) weighed by what each does on that data."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"compress: rank must be a positive int, got {rank!r}")
    if adapter_name not in model.peft_config:
        raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    batches = list(calibration) if calibration is not None else None  # read twice for a band
    moments = activation_moments(model, adapter_name, batches) if batches is not None else {}
    kept, values, shares, bands = {}, {}, {}, {}
    kept_norm = total_norm = 0.0
    for name, layer in model.spectral_layers().items():
        if adapter_name not in layer.sigma_adapters:
            continue
        adapter = layer.sigma_adapters[adapter_name]
        singular = _singular_update(layer, adapter_name)  # ΔΣ (r, r) over the adapter's directions
        update = singular * moments[name].sqrt()[None, :] if name in moments else singular  # ΔΣ diag(√c)
        score = update.square().sum(dim=0) + update.square().sum(dim=1)  # (r,)
        chosen = sorted(torch.topk(score, min(rank, len(score))).indices.tolist())
        index = torch.tensor(chosen, device=update.device)
        kept[name] = [adapter.indices.tolist()[i] for i in chosen]
        if name in moments and adapter.structure.name == "band":
            bands[name] = chosen, singular  # a calibrated band: refitted below, not truncated
        else:
            values[name] = adapter.structure.restrict(adapter.vector.detach(), index)  # the kept part
        part, whole = float(update[index][:, index].square().sum()), float(update.square().sum())
        shares[name] = (part / whole) ** 0.5 if whole > 0 else 1.0
        kept_norm, total_norm = kept_norm + part, total_norm + whole
    if bands:
        values.update(_refitted_bands(model, adapter_name, bands, batches))
    compressed = dataclasses.replace(
        config, rank=rank, selection=kept, target_modules=list(kept), init="zeros"
    )
    model._add(new_name, compressed, kept, None, drop_small=False)
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            if name in values:
                layer.sigma_adapters[new_name].vector.copy_(values[name])
    total = (kept_norm / total_norm) ** 0.5 if total_norm > 0 else 1.0
    return Compression(shares, total, rank, calibrated=bool(moments))


@torch.no_grad()
def activation_moments(model, adapter_name: str, batches, among=None) -> dict[str, torch.Tensor]:
    """Layer → c (r,), the mean over tokens of (v_iᵀ x)² at adapter_name's directions, while the model (as
    it is: its active adapter applies) runs `batches`: dicts of model inputs (model(**batch)) or tensors of
    input ids. Padding tokens count like any other: pass unpadded batches (e.g. one example each).
    With `among` (layer → positions T among the adapter's directions): the full moments E[z_T z_Tᵀ]
    (|T|, |T|) of those layers instead."""
    layers = {n: m for n, m in model.spectral_layers().items() if adapter_name in m.sigma_adapters}
    if among is not None:
        layers = {n: m for n, m in layers.items() if n in among}
    if any(layer.merged_adapter is not None for layer in layers.values()):
        raise ValueError(
            "compress: unmerge() before calibrating (a merged layer's outputs include its update)"
        )
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def add(name: str, z: torch.Tensor) -> None:  # z (N, r)
        if among is None:
            sums[name] = sums.get(name, 0) + z.square().sum(dim=0)
        else:
            part = z[:, among[name]]  # (N, |T|)
            sums[name] = sums.get(name, 0) + part.T @ part
        counts[name] += z.shape[0]

    hooks = [_moment_hook(layer, adapter_name, lambda z, n=name: add(n, z)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    training, seen = model.training, 0
    model.eval()
    progress = Progress(len(batches) if hasattr(batches, "__len__") else None, "calibration", "batch")
    try:
        for batch in batches:
            inputs = batch if isinstance(batch, Mapping) else {"input_ids": batch}
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            seen += 1
            progress.update()
    finally:
        progress.close()
        for hook in hooks:
            hook.remove()
        model.train(training)
    if not seen or not sums:
        raise ValueError(
            "compress: the calibration data gave no batches that reach the adapter's layers; pass a few "
            "batches of model inputs (dicts, or input-id tensors), or calibration=None for the data-free score"
        )
    return {name: sums[name] / counts[name] for name in sums}


def _moment_hook(layer, adapter_name: str, add):
    """A hook giving add() z = Vᵀx (N, r) at the adapter's directions for each input x of the layer."""
    columns = layer.columns(adapter_name)
    basis = layer.sigma_basis[:, columns].float()  # (d, r): V (input side) or U (output side)
    if layer.side == "input":
        return layer.register_forward_pre_hook(
            lambda _, args: add(args[0].detach().reshape(-1, basis.shape[0]).float() @ basis)
        )
    sigma = layer.sigma_at(layer.sigma_adapters[adapter_name].positions).float()
    bias = bias_of(layer.base_layer)

    def hook(_, args, output):  # output = W x + b, the base layer's: Uᵀ(W x) = Σ Vᵀ x
        flat = output.detach().reshape(-1, basis.shape[0]).float()
        add(((flat if bias is None else flat - bias.float()) @ basis) / sigma)

    return layer.base_layer.register_forward_hook(hook)


def _refitted_bands(model, adapter_name: str, bands: dict, batches) -> dict[str, torch.Tensor]:
    """Layer → the compressed band (2b+1, R) over its kept directions, least squares on the data (see the
    module docstring); bands: layer → (the kept directions, ΔΣ (r, r))."""
    layers = model.spectral_layers()
    supports = {}  # layer → T: the kept directions and every column their rows of ΔΣ reach
    for name, (chosen, _) in bands.items():
        vector = layers[name].sigma_adapters[adapter_name].vector  # (2b+1, r)
        width, r = half_width(vector), vector.shape[1]
        reach = {j for i in chosen for j in range(max(0, i - width), min(r, i + width + 1))}
        supports[name] = sorted(reach | set(chosen))
    among = {name: torch.tensor(t, device=layers[name].sigma_values.device) for name, t in supports.items()}
    moments = activation_moments(model, adapter_name, batches, among=among)
    refitted = {}
    for name, (chosen, update) in bands.items():
        layer = layers[name]
        adapter = layer.sigma_adapters[adapter_name]
        width = half_width(adapter.vector)
        at = {direction: k for k, direction in enumerate(supports[name])}
        rows = update.double()[chosen][:, supports[name]]  # (R, |T|): a_i over T, all of its support
        best = _least_squares_rows(rows, moments[name].double(), [at[i] for i in chosen], width)
        sigma = layer.sigma_at(adapter.positions).detach().double()[chosen]  # σ_S (R,)
        matrix = best / (sigma[:, None] if layer.side == "input" else sigma[None, :])  # M' from ΔΣ'
        refitted[name] = dense_to_band(matrix, width).to(adapter.vector.dtype)
    return refitted


def _least_squares_rows(rows, covariance, kept, width: int) -> torch.Tensor:
    """ΔΣ' (R, R): per kept row p, the band coefficients over kept positions q (|p − q| ≤ width) that
    minimise (a_p − a'_p)ᵀ C (a_p − a'_p); rows (R, |T|) and C (|T|, |T|) over T, kept: S's places in T."""
    count, span = rows.shape[0], 2 * width + 1
    slots = torch.arange(count)[:, None] + torch.arange(-width, width + 1)[None, :]  # (R, 2b+1) in S
    valid = ((slots >= 0) & (slots < count)).to(rows.device)
    slots = slots.clamp(0, count - 1).to(rows.device)
    columns = torch.tensor(kept, device=rows.device)[slots]  # (R, 2b+1) places in T
    gram = covariance[columns[:, :, None], columns[:, None, :]]  # C_JJ (R, 2b+1, 2b+1)
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(span, dtype=gram.dtype, device=gram.device)
    gram = torch.where(pair, gram, eye * (~valid)[:, :, None])  # slots outside S: identity, right side 0
    right = torch.where(valid, (covariance[columns] @ rows[:, :, None]).squeeze(-1), 0.0)  # C_J,: a (R, 2b+1)
    coefficients = (torch.linalg.pinv(gram, hermitian=True, rtol=1e-12) @ right[:, :, None]).squeeze(-1)
    best = rows.new_zeros(count, count)
    row_index = torch.arange(count, device=rows.device)[:, None].expand_as(slots)
    best[row_index[valid], slots[valid]] = coefficients[valid]
    return best


def _singular_update(layer, adapter_name: str) -> torch.Tensor:
    """ΔΣ (r, r): the update in the singular basis of the adapter's own directions."""
    adapter = layer.sigma_adapters[adapter_name]
    sigma = layer.sigma_at(adapter.positions).detach()
    if adapter.structure.elementwise:
        return torch.diag(adapter.rule.deltas(adapter.vector.detach(), sigma))  # diag(δ)
    matrix = adapter.structure.to_dense(layer.own_scales(adapter_name).detach())  # M (r, r)
    return sigma[:, None] * matrix if layer.side == "input" else matrix * sigma[None, :]
