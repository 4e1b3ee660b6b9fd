"""ScaleTables: per layer, one table of adapter scales G (capacity × R) over that layer's stored basis.

Row 0 is the base model (zeros) and is never handed out; every other row is free or holds the scales g
of one adapter (zeros where it trains nothing). A mixed batch is a gather, G[ids] (B, R) per layer, and
a mix of adapters is a weighted sum of rows (the update is linear in g). The tables know rows only:
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

    @property
    def capacity(self) -> int:
        """Rows of every table, row 0 (the base model) included."""
        return next(iter(self.tables.values())).shape[0]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    def take(self) -> int:
        """A free row (the tables double when none is left)."""
        if not self._free:
            old = self.capacity
            for name, table in self.tables.items():
                self.tables[name] = torch.cat([table, torch.zeros_like(table)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def write(self, rows: int | list[int], scales: dict[str, torch.Tensor]) -> None:
        """Put scales into one row ((R,) per layer) or several ((len(rows), R) per layer); a layer that
        scales does not name gets zeros there (the adapter leaves it as the base layer)."""
        unknown = sorted(set(scales) - set(self.tables))
        if unknown:
            raise ValueError(f"scales for layers these tables do not hold: {unknown[:3]}")
        index = rows if isinstance(rows, int) else torch.tensor(rows, device=self.device)
        for name, table in self.tables.items():
            table[index] = scales[name].to(table) if name in scales else 0.0

    def free(self, row: int) -> None:
        """Zero a row and hand it back."""
        for table in self.tables.values():
            table[row] = 0.0
        self._free.append(row)

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """One row of every table, (R,) per layer (views)."""
        return {name: table[row] for name, table in self.tables.items()}

    def combine(self, weights: dict[int, float]) -> dict[str, torch.Tensor]:
        """Σ_k w_k G[k] per layer for row k → weight w_k: the scales of the mixed adapter."""
        return {
            name: sum(weight * table[row] for row, weight in weights.items())
            for name, table in self.tables.items()
        }

    def gather(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """G[ids] per layer, (B, R): the rows of scales of a batch whose row b uses table row ids[b]."""
        return {name: table.index_select(0, ids) for name, table in self.tables.items()}
