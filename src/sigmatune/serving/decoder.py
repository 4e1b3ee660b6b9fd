"""SlotDecoder: the model's forward over a SlotCache (slots.py) with each batch row on its own adapter —
prefill chunks, eager; decode steps, one CUDA graph per bucket of batch size and attended length on
CUDA (eager elsewhere).

A decode step's inputs live in static buffers (tokens, positions, adapter rows, write slots: (4, slots)),
and the graph gathers each row's scales from the bank's tables inside itself, so loading an adapter into a
row changes what the next replay computes without a recapture. Only a reallocation of the tables (their
generation: more rows, or a wider band) drops the graphs. A replay holds the bank's lock, so a hot-load
lands wholly before or after a step.

Buckets: the batch is padded to the next power of two (padding rows: token 0, position 0, the base
model, writing to the scratch slot) and attention reads the first 2^k ≥ 64 positions that cover the
longest row, so a few dozen graphs serve every batch; each is captured the first time it is needed.
"""

from __future__ import annotations

import contextlib

import torch

from .bank import AdapterBank
from .slots import ATTENTION, SlotCache, SlotStep


class SlotDecoder:
    def __init__(self, model, bank: AdapterBank | None, slots: int, length: int, graphs: bool | None = None):
        self.model, self.bank = model, bank  # bank None: the plain model, every row on the base
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.device, dtype = weight.device, weight.dtype
        self.cache = SlotCache(self.model.config, slots, length, self.device, dtype)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; pass graphs=False")
        self._inputs = torch.zeros(
            4, slots, dtype=torch.long, device=self.device
        )  # tokens, positions, rows, writes
        self._span = torch.arange(length, device=self.device)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation = None  # the tables' generation the captured graphs read
        self._pool = None
        self.captures = 0  # graphs captured so far (a hot-load must not add one)

    @property
    def vocabulary(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    # ---- prefill --------------------------------------------------------------------------------------

    def prefill(self, chunks: list[tuple[int, int, list[int], int]]) -> torch.Tensor:
        """Run prompt chunks (slot, start position, tokens, adapter row), one per batch row, left-padded;
        returns (B, V) fp32: the logits after each chunk's last token."""
        width = max(len(tokens) for _, _, tokens, _ in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        writes = torch.full_like(ids, self.cache.scratch)
        positions = torch.zeros_like(ids)
        for b, (slot, start, tokens, _) in enumerate(chunks):
            pad = width - len(tokens)
            ids[b, pad:] = torch.tensor(tokens)
            writes[b, pad:] = slot
            positions[b, pad:] = torch.arange(start, start + len(tokens))
        ids, writes, positions = (t.to(self.device) for t in (ids, writes, positions))
        reach = self._reach(max(start + len(tokens) for _, start, tokens, _ in chunks))
        visible = (self._span[:reach] <= positions[:, :, None])[:, None]  # (B, 1, T, reach)
        slots = torch.tensor([slot for slot, *_ in chunks], device=self.device)
        step = SlotStep(writes, positions, visible, read_rows=slots)
        rows = torch.tensor([row for *_, row in chunks], device=self.device)
        return self._forward(ids, positions, step, rows, logits_to_keep=1)

    # ---- decode ---------------------------------------------------------------------------------------

    def decode(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """One token for each of n rows (row b in slot b): token b fed at positions[b] on adapter row
        rows[b]; returns (n, V) fp32 logits."""
        n = len(tokens)
        size = self._bucket(n)
        pad = size - n
        host = torch.tensor(
            [
                tokens + [0] * pad,
                positions + [0] * pad,
                rows + [0] * pad,
                list(range(n)) + [self.cache.scratch] * pad,
            ]
        )
        with self._locked():
            self._inputs[:, :size].copy_(host, non_blocking=self.graphs)
            return self._run(n, size, self._reach(max(positions) + 1))

    def decode_again(self, tokens: torch.Tensor, top: int) -> torch.Tensor:
        """The next step of the rows decode() ran last, each one position on, fed tokens (n,) on the device
        (that step's sampled tokens: no host data, so the host need not wait for them); top: the rows'
        highest position now. Returns (n, V) fp32 logits."""
        n = tokens.shape[0]
        with self._locked():
            self._inputs[0, :n].copy_(tokens)
            self._inputs[1, :n] += 1
            return self._run(n, self._bucket(n), self._reach(top + 1))

    def _bucket(self, n: int) -> int:
        """The batch size a step of n rows runs at: the next power of two, at most the slots."""
        return min(1 << (n - 1).bit_length(), self.cache.slots)

    def _locked(self):
        """The bank's lock (a replay reads its tables; a hot-load lands wholly before or after a step)."""
        return self.bank.lock if self.bank else contextlib.nullcontext()

    def _run(self, n: int, size: int, reach: int) -> torch.Tensor:
        """The step over the inputs now in the static buffers: its graph replayed, or eager; (n, V)."""
        if not self.graphs:
            return self._decode_step(size, reach)[:n]
        graph, out = self._graph(size, reach)
        graph.replay()
        return out[:n]

    def _decode_step(self, size: int, reach: int) -> torch.Tensor:
        tokens, positions, rows, writes = self._inputs[:, :size]
        visible = (self._span[:reach] <= positions[:, None])[:, None, None, :]  # (size, 1, 1, reach)
        step = SlotStep(writes[:, None], positions[:, None], visible, lengths=positions + 1)
        return self._forward(tokens[:, None], positions[:, None], step, rows)

    def _graph(self, size: int, reach: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured decode step of this bucket (captured now if new). The warm-up runs the step that
        is about to be replayed: it writes the same keys and values, so running it again changes nothing."""
        generation = self.bank.tables.generation if self.bank else 0
        if self._generation != generation:
            self._captured.clear()
            self._generation = generation
        if (size, reach) not in self._captured:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode_step(size, reach)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._decode_step(size, reach)
            self._pool = graph.pool()
            self._captured[(size, reach)] = (graph, out)
            self.captures += 1
        return self._captured[(size, reach)]

    # ---- shared -----------------------------------------------------------------------------------------

    def _reach(self, positions: int) -> int:
        """Positions a step attends over: the next power of two ≥ 64 holding `positions`, at most the cache's."""
        return min(max(64, 1 << (positions - 1).bit_length()), self.cache.length)

    def _forward(self, ids, positions, step: SlotStep, rows, **kwargs) -> torch.Tensor:
        serving = self.bank.serving(rows) if self.bank else contextlib.nullcontext()
        with self._slot_attention(), serving:
            logits = self.model(
                input_ids=ids,
                position_ids=positions,
                use_cache=False,
                slot_cache=self.cache,
                slot_step=step,
                **kwargs,
            ).logits
        return logits[:, -1].float()

    @contextlib.contextmanager
    def _slot_attention(self):
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = before
