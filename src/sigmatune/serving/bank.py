"""AdapterBank: thousands of adapters of one base model, served together in mixed batches.

Every adapter on the same bases is one row of scales per layer, so the bank keeps, per layer, a
table G (capacity × R) — row 0 is the base model (zeros; tables.py). A batch whose rows use adapters
`ids` runs each layer as x + ((x V) ⊙ G[ids]) Vᵀ: the cost of a single adapter (mixed.py: on CUDA one
kernel launch, gathering inside it, for up to three layers that read the same input).
The bank decides which adapter holds which row, checks what it loads, and keeps the rows resident.

- Adapters nest: a top-16 adapter sits in a bank whose layers store the top 64 (its row is zero
  elsewhere); an adapter selecting directions the bank's layers do not store is refused.
- Mixes are rows too: Σ_k w_k G[k] is exactly the adapter whose δ is Σ_k w_k δ_k (the update is
  linear in g), so a Transformer²-style expert mix costs nothing extra and no weight is built. A mix's
  row is that sum at the time it is made, so loading an adapter again (load, add_from_model) rebuilds
  every mix of it, resident or spilled, and removing an adapter removes its mixes. mix_name gives a mix
  one name whatever order or spelling of its weights (the server keys mixes by it).
- With max_resident, the least recently used adapter leaves the tables when a new one needs a
  row; it comes back from its folder (or from a spill file, for mixes) the next time it is asked for.
All methods are thread-safe (the server hot-loads while the engine decodes).

The bank owns serving; the model does not know it. bank(input_ids, adapter_ids=...) and
bank.generate(...) run the model with each row's scales handed to every layer through
SpectralLinear.serve_rows() (as vLLM's LoRA manager sets each layer's mapping), and take them back after.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.config import SigmaConfig
from ..core.structures.registry import structure_of
from ..formats.adapter_file import read_adapter
from ..formats.base_check import check_spectra, check_structure
from ..formats.files import atomic_save_tensors, load_tensors
from ..model.sigma_model import SigmaModel
from ..ops import switches
from .folded import Folds
from .mixed import MixedBatch, SharedInputs
from .tables import ScaleTables

BASE = "base"  # the name of row 0


class AdapterBank:
    """Per-layer tables of adapter scales over a SigmaModel's stored bases."""

    def __init__(
        self,
        model: SigmaModel,
        max_resident: int | None = None,
        spill_dir: str | Path | None = None,
        capacity=16,
        disable_kernels=(),
    ):
        self.model = model
        # kernels turned off for this bank, beside the environment's (ops/switches.py)
        self.disabled_kernels = switches.checked(disable_kernels)
        self.layers = model.spectral_layers()  # name → SpectralLinear
        if not self.layers:
            raise ValueError(
                "the model has no spectral layers; wrap it (or ensure_bases) before making a bank"
            )
        self.max_resident = max_resident
        if spill_dir is None and max_resident is not None:  # evicted mixes must come back from somewhere
            spill_dir = tempfile.mkdtemp(prefix="sigmatune-spill-")
        self.spill_dir = Path(spill_dir) if spill_dir else None
        device = next(iter(self.layers.values())).sigma_basis.device
        self.tables = ScaleTables(
            {name: layer.stored_rank for name, layer in self.layers.items()}, device, capacity
        )
        self.device = self.tables.device  # where the tables (and the ids of a batch) live
        self.rows: OrderedDict[str, int] = OrderedDict()  # resident name → row, least recently used first
        self.sources: dict[str, Path] = {}  # name → adapter folder or spill file to (re)load from
        self.mixes: dict[str, dict[str, float]] = {}
        self._lock = threading.RLock()
        self.version = 0  # counts changes of which adapter holds which row (a decoder's ids go stale)
        self._shared = SharedInputs(self.layers)  # which layers share a launch of the mixed-batch kernel
        self._folds = Folds()  # their projections folded into base GEMMs (folded.py)

    @classmethod
    def over(cls, base: torch.nn.Module, config: SigmaConfig, **kwargs) -> AdapterBank:
        """A bank over a plain model: its config.target_modules get the bases config selects (e.g. rank=64
        serves every principal adapter up to r=64), with no adapter of their own."""
        model = SigmaModel(base)
        model.ensure_bases(config, model.plan(config), pin=True)
        return cls(model, **kwargs)

    # ---- adding and removing ------------------------------------------------------------------------

    @staticmethod
    def mix_name(weights: dict[str, float]) -> str:
        """The canonical name of the mix Σ w_k adapter_k: "mix:a=0.5,b=1.0", parts sorted by name, each
        weight as a float's repr (so {"b": 1, "a": 0.5}, {"a": 0.50, "b": 1.0} name one mix)."""
        return "mix:" + ",".join(
            f"{part}={float(weight) + 0.0!r}" for part, weight in sorted(weights.items())
        )

    def load(self, name: str, directory: str | Path, replace: bool = False) -> int:
        """Add (or with replace=True, swap in) a saved adapter; returns its row. Its mixes are rebuilt."""
        with self._lock:
            row = self._load(name, directory, replace)
            self._rebuild_mixes_of(name)
        return row

    def _load(self, name: str, directory: str | Path, replace: bool) -> int:
        record = read_adapter(directory)
        check_structure(directory, record, self.model.base_model)
        unserved = sorted(set(record.layers) - set(self.layers))
        if unserved:
            raise ValueError(f"{directory}: adapts layers the bank has no bases for: {unserved[:3]}")
        for layer_name, saved in record.layers.items():
            absent = sorted(set(saved.indices.tolist()) - set(self.layers[layer_name].stored_indices))
            if absent:
                raise ValueError(
                    f"{directory}: selects singular directions {absent[:5]} of layer {layer_name!r}, which the "
                    f"bank's bases do not hold (it holds {len(self.layers[layer_name].stored_indices)} there); "
                    "serve it from a bank whose selection contains it (e.g. a larger rank)"
                )
        check_spectra(directory, record, self.layers)
        structure = structure_of(record.config.structure, record.config.band)
        scales = {  # each layer's table row: g, or M's diagonals (Structure.as_band)
            layer_name: structure.as_band(
                self.layers[layer_name].scales_for(
                    saved.indices.tolist(), saved.vector, record.config.update, structure
                )
            )
            for layer_name, saved in record.layers.items()
        }
        with self._lock:
            row = self._store(name, scales, replace)
            self.sources[name] = Path(directory)
        return row

    def add_from_model(self, name: str, adapter_name: str | None = None, replace: bool = False) -> int:
        """Add an adapter that lives in the bank's SigmaModel (e.g. one just trained); returns its row.
        Its mixes are rebuilt."""
        adapter_name = adapter_name or self.model.active_adapter
        scales = {
            layer_name: layer.sigma_adapters[adapter_name].structure.as_band(
                layer.scales(adapter_name).detach()
            )
            for layer_name, layer in self.layers.items()
            if adapter_name in layer.sigma_adapters
        }
        if not scales:
            raise KeyError(f"the model has no adapter {adapter_name!r}")
        with self._lock:
            row = self._store(name, scales, replace)
            self._spill(name)
            self._rebuild_mixes_of(name)
        return row

    def add_many(self, names: list[str], scales: dict[str, torch.Tensor]) -> list[int]:
        """Add many adapters at once from their scales: layer name → (len(names), R) table block."""
        with self._lock:
            clashes = sorted(set(names) & (set(self.rows) | {BASE}))
            if clashes or len(set(names)) != len(names):
                raise ValueError(f"adapter names must be new and distinct: {clashes[:5] or 'repeated names'}")
            if self.max_resident is not None and len(self.rows) + len(names) > self.max_resident:
                raise ValueError("add_many cannot evict: raise max_resident or add the adapters one by one")
            rows = [self.tables.take() for _ in names]
            self.tables.write(rows, scales)
            self.rows.update(zip(names, rows, strict=True))
            self.version += 1
        return rows

    def add_mix(self, name: str, weights: dict[str, float], replace: bool = False) -> int:
        """Add the weighted combination Σ w_k adapter_k as an adapter of its own (no weights built)."""
        if not weights:
            raise ValueError("a mix needs at least one adapter and its weight")
        with self._lock:
            rows = {self.row(part): weight for part, weight in weights.items()}  # hot-loads evicted parts
            row = self._store(name, self.tables.combine(rows), replace)
            self.mixes[name] = dict(weights)
            self._spill(name)
        return row

    def remove(self, name: str) -> None:
        """Drop an adapter (or a mix) and every mix of it."""
        with self._lock:
            if name not in self.rows and name not in self.sources:
                raise KeyError(f"no adapter {name!r} in the bank")
            for gone in [name, *self.mixes_of(name)]:
                self._release(gone)
                source = self.sources.pop(gone, None)
                if source is not None and source.parent == self.spill_dir:
                    source.unlink(missing_ok=True)
                self.mixes.pop(gone, None)

    def mixes_of(self, name: str) -> list[str]:
        """The mixes that have adapter `name` as a part."""
        with self._lock:
            return [mix for mix, weights in self.mixes.items() if name in weights]

    # ---- looking up -----------------------------------------------------------------------------------

    def row(self, name: str) -> int:
        """The table row of an adapter ('base' = 0), loading it back if it was evicted."""
        with self._lock:
            if name == BASE:
                return 0
            if name in self.rows:
                self.rows.move_to_end(name)
                return self.rows[name]
            if name not in self.sources:
                raise KeyError(f"unknown adapter {name!r}; the bank holds {self.names()[:20]}")
            source = self.sources[name]
            if source.suffix == ".safetensors":
                tensors, _ = load_tensors(source)
                return self._store(name, {k: v for k, v in tensors.items() if k in self.layers}, False)
            return self._load(name, source, False)  # back from its folder as it was: its mixes stand

    def ids(self, names, device=None) -> torch.Tensor:
        """Row ids for a batch (B,): one adapter name or row id per row, or a tensor of row ids."""
        if isinstance(names, torch.Tensor):
            return names.to(device or self.device, torch.long)
        rows = [name if isinstance(name, int) else self.row(name) for name in names]
        return torch.tensor(rows, dtype=torch.long, device=device or self.device)

    @contextlib.contextmanager
    def serving(self, ids: torch.Tensor):
        """Within this block, each batch row b of the model's input uses adapter row ids[b]: every layer
        gets a server of this batch (mixed.py: the fused kernel on CUDA, else a gather and torch ops)
        through SpectralLinear.serve_rows, and gives it back at the end. The bank's lock is held
        throughout, so a hot-load lands wholly before or after the forward."""
        with self._lock:
            batch = MixedBatch(
                self.layers, self.tables.tables, ids, self._shared, self._folds, self.disabled_kernels
            )
            for name, layer in self.layers.items():
                layer.serve_rows(batch.server(name))
            try:
                yield
            finally:
                for layer in self.layers.values():
                    layer.serve_rows(None)
                batch.finish()

    def fold(self) -> None:
        """From the next served forward on, fold each group's projections into its first layer's GEMM
        (folded.py): those layers' base weights (q's, k's and v's; o's; down's) become views of one buffer
        per group, with the same values, so the model computes as before; the serving engine folds its
        bank. unfold() undoes it. A forward folds nothing while the bank's kernels exclude "fold"
        (ops/switches.py: MixedBatch asks)."""
        with self._lock:
            self._folds.on = True

    def unfold(self) -> None:
        """Undo fold(): every folded layer's weight its own storage again (the same values)."""
        with self._lock:
            self._folds.unfold(self.layers)

    def __call__(self, *args, adapter_ids, **kwargs):
        """The model's forward with batch row b on adapter adapter_ids[b] (a name, 'base' or a row id)."""
        with self.serving(self.ids(adapter_ids)):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_ids, **kwargs):
        """The model's generate() with batch row b on adapter adapter_ids[b], prefill and every step."""
        with self.serving(self.ids(adapter_ids)):
            return self.model.generate(*args, **kwargs)

    @property
    def lock(self) -> threading.RLock:
        """Held while the tables change: a CUDA graph that reads them is replayed under it, so a hot-load
        lands wholly before or after a step."""
        return self._lock

    def names(self) -> list[str]:
        """Every adapter the bank can serve (resident or not), 'base' first."""
        with self._lock:
            return [BASE, *sorted(set(self.rows) | set(self.sources))]

    def memory_bytes(self) -> int:
        """Bytes of the tables of scales (what the resident adapters cost, on the device)."""
        return self.tables.memory_bytes()

    # ---- internals ------------------------------------------------------------------------------------

    def _store(self, name: str, scales: dict[str, torch.Tensor], replace: bool) -> int:
        if name == BASE:
            raise ValueError(f"{BASE!r} is the base model's name; pick another adapter name")
        unknown = sorted(set(scales) - set(self.layers))
        if unknown:
            raise ValueError(f"adapter {name!r} adapts layers this bank does not serve: {unknown[:3]}")
        if name in self.rows and not replace:
            raise ValueError(f"adapter {name!r} is already in the bank; pass replace=True to swap it")
        row = self.rows.pop(name) if name in self.rows else self._take_row()
        self.tables.write(row, scales)
        self.rows[name] = row
        self.version += 1
        return row

    def _take_row(self) -> int:
        if self.max_resident is not None and len(self.rows) >= self.max_resident:
            self._release(next(iter(self.rows)))  # the least recently used
        return self.tables.take()

    def _release(self, name: str) -> None:
        row = self.rows.pop(name, None)
        if row is not None:
            self.tables.free(row)
            self.version += 1

    def _spill(self, name: str, scales: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a copy of an adapter that has no folder (its row's scales unless given), so eviction can
        bring it back."""
        if self.spill_dir is None:
            return
        path = (
            self.spill_dir / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.safetensors"
        )  # any name is safe
        scales = self.tables.read(self.rows[name]) if scales is None else scales
        atomic_save_tensors(path, scales, metadata={"sigmatune_bank_row": name})
        self.sources[name] = path

    def _rebuild_mixes_of(self, name: str) -> None:
        """Σ_k w_k G[k] again for every mix with `name` as a part (its row, in place, if resident; its
        spill file either way), after that adapter's row was written anew."""
        for mix in self.mixes_of(name):
            scales = self.tables.combine({self.row(part): w for part, w in self.mixes[mix].items()})
            if mix in self.rows:
                self._store(mix, scales, replace=True)
            self._spill(mix, scales)


def bases_for(
    adapter_dirs: list[Path], base_model: torch.nn.Module | None = None, skipped: dict | None = None
) -> dict[str, list[int]]:
    """Layer → the union of the singular-value indices the saved adapters select: the bases a bank needs
    to serve them all. With base_model, each adapter's layers must fit it too (check_structure). With
    `skipped` (a dict), a folder that cannot be read or does not fit goes there (folder → the error)
    instead of raising."""
    plan: dict[str, set[int]] = {}
    for folder in adapter_dirs:
        try:
            record = read_adapter(folder)
            if base_model is not None:
                check_structure(folder, record, base_model)
        except (ValueError, OSError) as err:
            if skipped is None:
                raise
            skipped[folder] = err
            continue
        for layer, saved in record.layers.items():
            plan.setdefault(layer, set()).update(saved.indices.tolist())
    return {layer: sorted(indices) for layer, indices in plan.items()}
