"""Several adapters of one model trained at once: one forward, each batch row through its own adapter.

K adapters with the same structure, update rule and directions in every layer (one config: a learning-rate
sweep's candidates, many users' fine-tunes) are stacked, layer by layer, into one trained tensor

    C  (K, *shape)      row k: adapter k's vector (g or δ (K, r), a band's diagonals (K, 2b+1, r), M (K, r, r))

and a forward with one adapter index per batch row, ids (B,), computes in every layer

    table = spread(rule(C, σ_S))       (K, R …)   every adapter's coefficients over the stored columns
    y     = forward_rows(x, table[ids])            each row b with adapter ids[b]'s, as a served mixed batch

so the backward accumulates each adapter's gradient from its own rows (the gather's backward is a
scatter-add over ids: no loop over adapters), and a sum of per-adapter losses gives every adapter the
gradient of its own loss: K adapters trained together are each trained alone on their rows. forward_rows is
the op's per-row call (core/transform.transform_rows): a chosen backend's passes, the fused kernel for a
diagonal on CUDA.

Each adapter's vector stays a view of its row of C while they train together, so saving one adapter then
(save_pretrained) writes its current values; at the end each gets its own copy back. Inside the block every
forward routes rows by the last ids given (rows(), or the adapter_ids of the call): to score one adapter
alone, leave the block (or give all rows its index).
C is a parameter of its layer (`sigma_bank`), so model.parameters() — an optimizer, DDP — finds it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layer import SpectralLinear
from ..core.structures.registry import structure_of

BANK = "sigma_bank"  # the stacked tensor's name in each layer


class Together:
    """K adapters of a SigmaModel trained in one batch (see the module docstring). Use it as a context:

    with Together(model, ["a", "b"]) as together:
        together.rows(ids)            # (B,) adapter index per batch row, before each forward
        loss = ...; loss.backward()   # the gradients land in together.banks()
    """

    def __init__(self, model, names: list[str]):
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"Together needs distinct adapter names, got {names!r}")
        missing = [n for n in names if n not in model.peft_config]
        if missing:
            raise KeyError(f"no adapter {missing[0]!r} in this model (have: {list(model.peft_config)})")
        self.model, self.names = model, list(names)
        self.layers: dict[str, SpectralLinear] = {}
        for name, layer in model.spectral_layers().items():
            present = [n for n in names if n in layer.sigma_adapters]
            if present and len(present) < len(names):
                absent = next(n for n in names if n not in layer.sigma_adapters)
                raise ValueError(
                    f"adapter {present[0]!r} adapts layer {name!r} and {absent!r} does not: only adapters of "
                    "one config (rank, structure, band, update, targets) train together"
                )
            if present:
                _check_alike(name, layer, self.names)
                self.layers[name] = layer
        self._ids: torch.Tensor | None = None
        self._entered: list[str] = []  # the layers whose adapters are stacked now

    def __enter__(self) -> Together:
        try:
            for name, layer in self.layers.items():
                if hasattr(layer, BANK):
                    raise ValueError(
                        f"layer {name!r} already trains adapters together; leave that block first"
                    )
                adapters = [layer.sigma_adapters[n] for n in self.names]
                bank = nn.Parameter(torch.stack([a.vector.detach() for a in adapters]))  # (K, *shape)
                layer.register_parameter(BANK, bank)
                self._entered.append(name)
                for k, adapter in enumerate(adapters):  # a view of row k: shares its storage
                    adapter.vector = nn.Parameter(bank.data[k], requires_grad=False)
                layer.serve_rows(_Rows(self, layer, adapters[0]))
        except BaseException:
            self.__exit__()  # the layers stacked so far get their adapters back
            raise
        self.model.training_together = self  # model(..., adapter_ids=ids) calls rows(ids) (forward.py)
        return self

    def __exit__(self, *exc) -> None:
        for name in self._entered:
            layer = self.layers[name]
            layer.serve_rows(None)
            bank = getattr(layer, BANK).detach()
            bank = bank.full_tensor() if hasattr(bank, "full_tensor") else bank  # FSDP2 shards its rows
            for k, n in enumerate(self.names):
                layer.sigma_adapters[n].vector = nn.Parameter(bank[k].clone())
            delattr(layer, BANK)
        self._entered, self._ids = [], None
        self.model.training_together = None
        self.model._refresh_trainable(set(self.names))  # the active adapter trains, as before the block

    def rows(self, ids) -> None:
        """The adapter of each batch row for the next forwards: ids (B,) indices into self.names, or the
        adapters' names."""
        if not isinstance(ids, torch.Tensor) and all(isinstance(i, str) for i in ids):
            ids = [self.index(name) for name in ids]
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.names))):
            raise ValueError(f"ids must be one adapter index in [0, {len(self.names)}) per batch row")
        layer = next(iter(self.layers.values()), None)  # on the layers' device once, not once per layer
        self._ids = ids if layer is None else ids.to(layer.sigma_basis.device, non_blocking=True)

    def banks(self) -> dict[str, nn.Parameter]:
        """Layer name → its stacked tensor C (K, *shape): what an optimizer steps."""
        return {name: getattr(layer, BANK) for name, layer in self.layers.items()}

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"adapter {name!r} does not train in this block (these do: {self.names})")
        return self.names.index(name)


class _Rows:
    """A layer's server while adapters train together: the table of every adapter's coefficients over the
    stored columns, gathered per batch row (forward_rows)."""

    def __init__(self, together: Together, layer: SpectralLinear, adapter):
        self.together, self.rule = together, adapter.rule
        self.sigma = layer.sigma_at(adapter.positions)  # (r,)
        self.target, self.source, shape = _placement(adapter, layer.stored_rank)
        self.shape = shape  # one adapter's coefficients over the stored columns
        band = adapter.structure.name == "band"
        self.structure = structure_of("band", (shape[0] - 1) // 2) if band else adapter.structure

    def __call__(self, layer: SpectralLinear, x: torch.Tensor) -> torch.Tensor:
        ids = self.together._ids
        if ids is None:
            raise ValueError("call Together.rows(ids) (one adapter index per batch row) before the forward")
        if x.shape[0] != len(ids):
            raise ValueError(f"the batch has {x.shape[0]} rows but rows() was given {len(ids)} adapter ids")
        bank = getattr(layer, BANK)  # (K, *shape)
        scales = self.rule.scales(bank, self.sigma)  # g = δ / σ for additive: σ over the last dimension
        table = scales if self.source is None else _spread(scales, self.target, self.source, self.shape)
        return layer.forward_rows(x, table[ids.to(x.device)], self.structure)


def _placement(adapter, stored: int):
    """Where each entry of an adapter's tensor lands in its spread over the `stored` columns: (target,
    source, spread shape) — flat indices — or (None, None, shape) when the spread is the tensor itself."""
    if adapter.positions is None:
        return None, None, tuple(adapter.vector.shape)
    probe = torch.arange(1, adapter.vector.numel() + 1, dtype=torch.float64, device=adapter.vector.device)
    spread = adapter.spread(probe.view(adapter.vector.shape), stored)  # entry i + 1 where entry i lands
    flat = spread.flatten()
    target = flat.nonzero().squeeze(1)
    return target, flat[target].long() - 1, tuple(spread.shape)


def _spread(scales: torch.Tensor, target, source, shape) -> torch.Tensor:
    """Every adapter's coefficients (K, *own) over the stored columns (K, *shape), zero elsewhere."""
    flat = scales.reshape(len(scales), -1)
    out = flat.new_zeros(len(scales), torch.Size(shape).numel())
    return out.index_copy(1, target, flat[:, source]).view(len(scales), *shape)


def _check_alike(layer_name: str, layer: SpectralLinear, names: list[str]) -> None:
    """Adapters train together in one layer only with the same directions, structure and update rule."""
    first = layer.sigma_adapters[names[0]]
    for name in names[1:]:  # each adapts this layer (Together's __init__ checked)
        other = layer.sigma_adapters[name]
        differs = (
            "directions" if not torch.equal(other.indices, first.indices) else
            "structure" if repr(other.structure) != repr(first.structure) else
            "update rule" if other.rule.name != first.rule.name else None
        )  # fmt: skip
        if differs:
            raise ValueError(
                f"adapters {names[0]!r} and {name!r} differ in their {differs} in layer {layer_name!r}: "
                "only adapters of one config (rank, structure, band, update, targets) train together"
            )
    if layer.merged_adapter is not None:
        raise ValueError(f"layer {layer_name!r} holds a merged adapter: unmerge() first")
