"""The engine sigmatune served with before the slot engine (kept for benchmarks/serve.py's before/after row).

Continuous batching over an AdapterBank: every active request decodes in one batch, each row with
its own adapter; new requests join between steps and finished ones leave.

One engine thread owns the model. A step either prefills the requests that arrived (left-padded into
one batch, their KV caches then merged into the running cache, padded on the left to a common
length) or decodes one token for every active request. Rows keep their own positions; the
attention mask hides the padding. Tokens go back through a callback, from the engine thread.

A prefill that raises (a bad token id from an API caller, a prompt that runs out of memory) fails only
the requests arriving with it; a decode step that raises fails the running batch, which is dropped.
Each failed request gets finish reason "error", failed_steps counts the step, and the engine goes on
with the next requests. Only BaseExceptions that are not Exceptions
(KeyboardInterrupt, SystemExit) stop it, and then every waiting client is told.
"""

from __future__ import annotations

import inspect
import queue
import threading

import torch
from transformers import DynamicCache

from sigmatune.serving.bank import AdapterBank
from sigmatune.serving.engine import Engine as SlotEngine
from sigmatune.serving.engine import Request  # a superset of the old one's fields


class Engine:
    """Runs requests over model + bank in a background thread (start(), submit(), cancel(), stop())."""

    def __init__(self, bank: AdapterBank, max_batch: int = 32, seed: int = 0):
        self.bank = bank
        self.model = bank.model.base_model
        self.device = bank.device
        self.max_batch = max_batch
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[Request] = []
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps = 0
        self.tokens = 0
        self._cache = None  # DynamicCache over the active rows, (B, heads, L, head_dim) per layer
        self._mask = None  # (B, L) long: 1 = a real token
        self._positions = None  # (B,) long: the position of each row's next token
        self._last = None  # (B,) long: each row's latest token
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_arg = (
            "cache" if "cache" in parameters else "past_key_values"
        )  # renamed in transformers 5.2x
        self._thread = None
        self._running = threading.Event()
        self.error: BaseException | None = None  # what stopped the engine (it serves no more)
        self.failed_steps = 0
        self.last_failure: str | None = None  # the latest failed step's exception

    # ---- control --------------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="sigmatune-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> Request:
        if self.error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self.error}")
        self.waiting.put(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop generating for a request: it leaves the batch (or the queue) at the next step, with a
        last event of finish reason "cancelled"."""
        request.cancelled = True

    # ---- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running.is_set():
                arrived = self._take(block=not self.active)
                with torch.no_grad():
                    if arrived:
                        self._guarded(self._prefill, arrived)
                    elif self.active:
                        self._guarded(self._decode)
        except BaseException as err:  # tell every waiting client instead of hanging them
            self.error = err
            for request in self.active + list(self.waiting.queue):
                request.emit(None, "error")
            raise

    def _guarded(self, step, *arrived: list[Request]) -> None:
        """Run one step; if it raises, its requests (those arriving and those active) fail, the batch
        state is dropped, and the loop goes on."""
        try:
            step(*arrived)
        except Exception as err:
            failed = [*self.active, *(r for r in (arrived[0] if arrived else []) if r not in self.active)]
            self.active = []
            self._cache = self._mask = self._positions = self._last = None
            self._fail(failed, err)

    def _fail(self, requests: list[Request], err: Exception) -> None:
        self.failed_steps += 1
        self.last_failure = f"{type(err).__name__}: {str(err)[:300]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory step leaves its blocks cached
        for request in requests:
            request.emit(None, "error")

    def _take(self, block: bool) -> list[Request]:
        room = self.max_batch - len(self.active)
        taken = []
        try:
            if block:
                taken.append(self.waiting.get(timeout=0.05))
            while len(taken) < room:
                taken.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        for request in taken:
            if request.cancelled:  # cancelled while waiting: its last event, and no work
                request.emit(None, "cancelled")
        return [r for r in taken if not r.cancelled]

    def _prefill(self, arrived: list[Request]) -> None:
        """Prefill the new requests together, then merge them into the running batch. If the prefill
        itself raises (before the merge), only the arriving requests fail: the running batch goes on."""
        try:
            cache, mask, first = self._prefill_forward(arrived)
        except Exception as err:
            self._fail(arrived, err)
            return
        start = len(self.active)
        self._merge(arrived, cache, mask, mask.sum(dim=1), first)
        self._deliver(first, start)

    def _prefill_forward(self, arrived: list[Request]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The arrived prompts, left-padded into one batch, through the model: (cache, mask, first tokens)."""
        width = max(len(r.prompt_ids) for r in arrived)
        ids = torch.zeros(len(arrived), width, dtype=torch.long)
        mask = torch.zeros(len(arrived), width, dtype=torch.long)
        for row, request in enumerate(arrived):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        rows = self.bank.ids([r.adapter for r in arrived], self.device)
        cache = DynamicCache()
        with self.bank.serving(rows):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
            ).logits[:, -1]
        return cache, mask, self._sample(logits, arrived)

    def _decode(self) -> None:
        """One token for every active request."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        rows = self.bank.ids([r.adapter for r in self.active], self.device)
        with self.bank.serving(rows):
            logits = self.model(
                input_ids=self._last[:, None],
                attention_mask=self._mask,
                position_ids=self._positions[:, None],
                use_cache=True,
                **{self._cache_arg: self._cache},
            ).logits[:, -1]
        self._positions = self._positions + 1
        self._deliver(self._sample(logits, self.active))

    def _deliver(self, tokens: torch.Tensor, start: int = 0) -> None:
        """Hand rows start… their new tokens; rows that are done leave the batch."""
        if start == 0:
            self._last = tokens
        self.steps += 1
        keep = list(range(start))
        for row, (request, token) in enumerate(zip(self.active[start:], tokens.tolist(), strict=True), start):
            request.generated += 1
            self.tokens += 1
            finish = None
            if token in request.stop_ids:
                finish, token = "stop", None
            elif request.generated >= request.max_tokens:
                finish = "length"
            elif request.cancelled:
                finish = "cancelled"
            if token is not None:
                request.emit(token, None)
            if finish:
                request.emit(None, finish)
            else:
                keep.append(row)
        if len(keep) < len(self.active):
            self._select(keep)

    # ---- batch state ------------------------------------------------------------------------------------

    def _merge(self, arrived, cache, mask, positions, first) -> None:
        if not self.active:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, first
            self.active = list(arrived)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        running, incoming = _left_pad(self._cache, self._mask, width), _left_pad(cache, mask, width)
        for old, new in zip(running[0].layers, incoming[0].layers, strict=True):
            old.keys = torch.cat([old.keys, new.keys])
            old.values = torch.cat([old.values, new.values])
        self._cache = running[0]
        self._mask = torch.cat([running[1], incoming[1]])
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, first])
        self.active += arrived

    def _select(self, keep: list[int]) -> None:
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        unused = int(
            (self._mask.sum(dim=0) == 0).long().cumprod(dim=0).sum()
        )  # all-padding columns on the left
        if unused:
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    # ---- sampling -----------------------------------------------------------------------------------------

    _sample = SlotEngine._sample  # the same sampling as the engine of today


def _left_pad(cache: DynamicCache, mask: torch.Tensor, width: int) -> tuple[DynamicCache, torch.Tensor]:
    """The cache and mask padded on the left to width positions (the padding is masked out)."""
    extra = width - mask.shape[1]
    if extra == 0:
        return cache, mask
    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
    return cache, torch.nn.functional.pad(mask, (extra, 0))
