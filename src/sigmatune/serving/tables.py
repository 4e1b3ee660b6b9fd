"""ScaleTables: per layer, one table of adapter scales G (capacity × R) over that layer's stored basis.

Row 0 is the base model (zeros) and is never handed out; every other row is free or holds the scales g
of one adapter (zeros where it trains nothing). A mixed batch is a gather, G[ids] (B, R) per layer, and
a mix of adapters is a weighted sum of rows (the update is linear in g). A layer that holds a band
adapter keeps bands instead: G (capacity, 2w+1, R), the diagonals of each row's M (structures.py), a
diagonal adapter's g on the middle one; w grows to the widest band written. The tables know rows only:
which adapter holds which row, and which adapters stay resident, is the bank's business (bank.py), as
vLLM keeps its LRU manager apart from the stacked LoRA weights.
"""

from __future__ import annotations

import torch


class ScaleTables:
    """Tables of fp32 scales, one per layer name, sharing row numbers; they double when full."""

    def __init__(self, ranks: dict[str, int], device: torch.device, capacity: int = 16):
        self.device = torch.device(device)
        self.tables = {name: torch.zeros(capacity, r, device=self.device) for name, r in ranks.items()}
        self._free = list(range(capacity - 1, 0, -1))  # popped from the end: the lowest row first
        self.generation = 0  # counts reallocations: a captured CUDA graph reads the tables of one generation

    @property
    def capacity(self) -> int:
        """Rows of every table, row 0 (the base model) included."""
        return next(iter(self.tables.values())).shape[0]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    def take(self) -> int:
        """A free row (the tables double when none is left)."""
        if not self._free:
            self.reserve(2 * self.capacity)
        return self._free.pop()

    def reserve(self, capacity: int) -> None:
        """Grow every table to at least `capacity` rows (new rows free), so that taking rows later moves
        no table."""
        old = self.capacity
        if capacity <= old:
            return
        for name, table in self.tables.items():
            self.tables[name] = torch.cat([table, table.new_zeros(capacity - old, *table.shape[1:])])
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.generation += 1

    def write(self, rows: int | list[int], scales: dict[str, torch.Tensor]) -> None:
        """Put scales into one row ((R,) per layer) or several ((len(rows), R) per layer); a layer that
        scales does not name gets zeros there (the adapter leaves it as the base layer)."""
        unknown = sorted(set(scales) - set(self.tables))
        if unknown:
            raise ValueError(f"scales for layers these tables do not hold: {unknown[:3]}")
        index = rows if isinstance(rows, int) else torch.tensor(rows, device=self.device)
        block = 0 if isinstance(rows, int) else 1  # leading dimensions of the scales before the band's
        for name in self.tables:
            if name not in scales:
                self.tables[name][index] = 0.0
                continue
            values = scales[name].to(self.device, torch.float32)
            if values.dim() > block + 1:  # a band: the table holds bands at least as wide
                self._widen(name, (values.shape[-2] - 1) // 2)
            self.tables[name][index] = _as_rows(values, self.tables[name], block)

    def _widen(self, name: str, w: int) -> None:
        """Make a layer's table hold bands of half-width ≥ w (a table of vectors becomes the middle band)."""
        table = self.tables[name]
        have = 0 if table.dim() == 2 else (table.shape[1] - 1) // 2
        if table.dim() == 3 and have >= w:
            return
        wide = table.new_zeros(table.shape[0], 2 * w + 1, table.shape[-1])
        if table.dim() == 2:
            wide[:, w] = table
        else:
            wide[:, w - have : w + have + 1] = table
        self.tables[name] = wide
        self.generation += 1

    def free(self, row: int) -> None:
        """Zero a row and hand it back."""
        for table in self.tables.values():
            table[row] = 0.0
        self._free.append(row)

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """One row of every table, (R,) per layer — (2w+1, R) for a table of bands (views)."""
        return {name: table[row] for name, table in self.tables.items()}

    def combine(self, weights: dict[int, float]) -> dict[str, torch.Tensor]:
        """Σ_k w_k G[k] per layer for row k → weight w_k: the scales of the mixed adapter."""
        return {
            name: sum(weight * table[row] for row, weight in weights.items())
            for name, table in self.tables.items()
        }

    def gather(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """G[ids] per layer, (B, R) or (B, 2w+1, R): the rows of a batch whose row b uses table row ids[b]."""
        return {name: table.index_select(0, ids) for name, table in self.tables.items()}


def _as_rows(values: torch.Tensor, table: torch.Tensor, block: int) -> torch.Tensor:
    """values shaped as the rows they fill: g into a table of bands goes on the middle diagonal, a band
    narrower than the table's is centred in it. block: 1 when values hold several rows, else 0."""
    if table.dim() == 2:
        return values  # g (…, R) into a table of vectors
    w = (table.shape[1] - 1) // 2
    out = values.new_zeros(*values.shape[:block], 2 * w + 1, values.shape[-1])
    if values.dim() == block + 1:  # g (…, R): the middle diagonal
        out[..., w, :] = values
    else:
        have = (values.shape[-2] - 1) // 2
        out[..., w - have : w + have + 1, :] = values
    return out
