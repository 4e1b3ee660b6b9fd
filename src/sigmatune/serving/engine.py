"""Continuous batching over an AdapterBank: every running request decodes in one batch, each row with
its own adapter; new requests join between steps and finished ones leave.

One engine thread owns the model and a SlotDecoder (decoder.py): a static KV cache of `max_batch` slots ×
`max_len` positions (slots.py), decode steps graphed on CUDA. Each loop turn prefills one chunk of the
waiting prompts (at most `prefill_tokens` tokens, long prompts over several turns), then decodes one token
for every running request. Running requests hold slots 0…n−1 in order (a request that leaves hands its
slot to the last one), so a decode step reads the cache as it lies; prompts prefill into other slots and
move to slot n when they are done. Tokens go back through a callback, from the engine thread.

A prefill chunk that raises (a bad token id from an API caller, a prompt that runs out of memory) fails
only the requests in it; a decode step that raises fails the running batch. Each failed request gets finish
reason "error", failed_steps counts the step, and the engine goes on with the next requests. Only
BaseExceptions that are not Exceptions (KeyboardInterrupt, SystemExit) stop it, and then every waiting
client is told. A request ends with "length" at max_tokens or when its slot is full (max_len positions).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .bank import AdapterBank
from .decode_step import Step, sample
from .decoder import SlotDecoder
from .slots import SlotCache, text_config

CPU_SLOTS = 32  # max_batch on a CPU
GPU_SLOTS = 1024  # the most max_batch chooses by itself on a GPU
GPU_SHARE = 0.5  # of the free GPU memory, at most, for the KV cache chosen by default


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str  # a name the bank serves ("base" = the base model)
    max_tokens: int
    emit: (
        callable  # emit(token_id | None, finish_reason | None): called for every token, then once at the end
    )
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: frozenset = frozenset()  # token ids that end the answer (e.g. end of turn)
    seed: int | None = None  # its own random stream (decode_step.sample), made at admission; None: engine's
    id: int = field(default_factory=itertools.count().__next__)
    generated: int = 0
    cancelled: bool = False
    slot: int = -1  # where its keys and values are
    prefilled: int = 0  # prompt tokens in the cache
    position: int = 0  # the position its next token goes to
    last: int = 0  # its latest token (the next decode step's input)
    row: int = 0  # its adapter's row in the bank's tables
    generator: torch.Generator | None = None  # from seed, on the engine's device
    finish: str | None = None  # why it ended, once it has


class Engine:
    """Runs requests over model + bank in a background thread (start(), submit(), cancel(), stop())."""

    def __init__(
        self,
        bank: AdapterBank | torch.nn.Module,
        max_batch: int | None = None,
        max_len: int | None = None,
        seed: int = 0,
        graphs: bool | None = None,
        prefill_tokens: int = 4096,
        look_ahead: bool | None = None,
    ):
        self.bank = bank if isinstance(bank, AdapterBank) else None  # a plain model serves only "base"
        if self.bank is not None:
            self.bank.fold()  # the engine owns its bank: projections ride in the base GEMMs (folded.py)
        self.model = self.bank.model.base_model if self.bank else bank
        text = text_config(self.model.config)
        self.max_len = max_len or min(getattr(text, "max_position_embeddings", 2048), 2048)
        self.max_batch = max_batch or _default_slots(self.model, self.max_len)
        self.decoder = SlotDecoder(self.model, self.bank, self.max_batch, self.max_len, graphs)
        self.device = self.decoder.device  # where the model's weights (and the KV cache) are
        self.prefill_tokens = prefill_tokens
        self.look_ahead = self.device.type == "cuda" if look_ahead is None else look_ahead
        self._ahead: Step | None = None  # a decode step launched, its tokens not yet taken
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.prefilling: list[Request] = []
        self.active: list[Request] = []  # decoding; active[i] holds slot i
        self._free = set(range(self.max_batch))
        self._bank_version = self.bank.version if self.bank else 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps = 0
        self.tokens = 0
        self.started = time.monotonic()
        self._thread = None
        self._running = threading.Event()
        self.error: BaseException | None = None  # what stopped the engine (it serves no more)
        self.failed_steps = 0
        self.last_failure: str | None = None  # the latest failed step's exception

    # ---- control --------------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._running.set()
        self.started = time.monotonic()
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
        if not request.prompt_ids or len(request.prompt_ids) >= self.max_len:
            raise ValueError(
                f"a prompt needs 1 to {self.max_len - 1} tokens (it has {len(request.prompt_ids)}): "
                "shorten it, or start the engine with a larger max_len"
            )
        self.waiting.put(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop generating for a request: it leaves the batch (or the queue) at the next step, with a
        last event of finish reason "cancelled"."""
        request.cancelled = True

    def stats(self) -> dict[str, float]:
        """Tokens per second since start and the share of slots decoding now."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"tokens_per_s": self.tokens / elapsed, "batch_occupancy": len(self.active) / self.max_batch}

    # ---- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running.is_set():
                self.step(block=not (self.active or self.prefilling))
        except BaseException as err:  # tell every waiting client instead of hanging them
            self.error = err
            for request in self.active + self.prefilling + list(self.waiting.queue):
                request.emit(None, "error")
            raise

    def step(self, block: bool = False) -> None:
        """One turn of the loop: admit waiting requests, prefill one chunk, decode one token for every
        running request. The engine thread calls it; without start(), a caller may drive it (benchmarks)."""
        self._admit(block)
        with torch.no_grad():
            self._refresh_rows()
            if self.prefilling:
                self._prefill()
            if self.active or self._ahead:
                self._decode()

    def idle(self) -> bool:
        return not (self.active or self.prefilling or self.waiting.qsize() or self._ahead)

    def _admit(self, block: bool) -> None:
        """Waiting requests take free slots (their adapter's row is looked up now)."""
        taken = []
        try:
            if block:
                taken.append(self.waiting.get(timeout=0.05))
            while len(taken) < len(self._free):
                taken.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        lowest = sorted(self._free, reverse=True)  # the lowest free slot first (popped from the end)
        for request in taken:
            if request.cancelled:  # cancelled while waiting: its last event, and no work
                request.emit(None, "cancelled")
                continue
            try:
                request.row = self._row(request.adapter)
            except Exception as err:
                self._fail([request], err)
                continue
            if request.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
            request.slot = lowest.pop()
            self._free.discard(request.slot)
            self.prefilling.append(request)

    def _refresh_rows(self) -> None:
        """After the bank moved adapters between rows, look every request's row up again."""
        if self.bank is None or self.bank.version == self._bank_version:
            return
        self._bank_version = self.bank.version
        for request in self.active + self.prefilling:
            try:
                request.row = self.bank.row(request.adapter)
            except KeyError as err:  # removed while running: that request ends
                request.cancelled = True
                self.last_failure = f"KeyError: {err}"

    def _row(self, adapter: str) -> int:
        if self.bank is not None:
            return self.bank.row(adapter)
        if adapter != "base":
            raise KeyError(f"this engine serves a plain model: only 'base', not {adapter!r}")
        return 0

    def _prefill(self) -> None:
        """One chunk of the waiting prompts; the requests whose prompt is done join the decoding batch."""
        chunk, budget = [], self.prefill_tokens
        for request in list(self.prefilling):
            if request.cancelled:
                self._release([request], "cancelled")
            elif budget > 0:
                piece = request.prompt_ids[request.prefilled : request.prefilled + budget]
                chunk.append((request, piece))
                budget -= len(piece)
        if not chunk:
            return
        self.steps += 1
        try:
            for request, piece in chunk:
                if max(piece) >= self.decoder.vocabulary or min(piece) < 0:
                    raise IndexError(
                        f"token id out of range 0…{self.decoder.vocabulary - 1} in request {request.id}'s prompt"
                    )
            logits = self.decoder.prefill([(r.slot, r.prefilled, piece, r.row) for r, piece in chunk])
        except Exception as err:
            self._release([r for r, _ in chunk], None)
            self._fail([r for r, _ in chunk], err)
            return
        done = []
        for b, (request, piece) in enumerate(chunk):
            request.prefilled += len(piece)
            if request.prefilled == len(request.prompt_ids):
                done.append((b, request))
        if not done:
            return
        first = self._sample(logits[[b for b, _ in done]], [r for _, r in done]).tolist()
        holders = {r.slot: r for r in self.prefilling}  # slot → the prefilling (or joining) request in it
        joining = {id(request) for _, request in done}
        self.prefilling = [r for r in self.prefilling if id(r) not in joining]
        for (_, request), token in zip(done, first, strict=True):
            self._join(request, holders)
            request.position = len(request.prompt_ids)
            self._advance(request, token)
        self._leave()

    def _decode(self) -> None:
        """One token for every request of a decode step — launched now, or by the turn before (look-ahead);
        if a step raises, the running batch fails. With look-ahead on, the next step over the same rows is
        launched from this one's tokens on the device before they come back to the host, so the host's work
        on them (and its issuing of the next step) overlaps the GPU's. That step is taken next turn: for
        requests that ended meanwhile (a stop token, a cancel) its token is dropped, and if rows joined or
        left, the turn after launches from the host again."""
        if self._ahead is not None and all(r.finish for r in self._ahead.batch):
            self._ahead = None  # every row of it ended: nothing to take
        if self._ahead is None and not self.active:
            return
        self.steps += 1
        try:
            step, self._ahead = self._ahead or self._launch(list(self.active)), None
            if self.look_ahead and self._goes_on(step):
                self._ahead = self._launch_again(step)
            tokens = step.tokens()
        except Exception as err:
            self._ahead = None
            failed = self.active
            self._free.update(r.slot for r in failed)
            self.active = []
            self._fail(failed, err)
            return
        for request, token in zip(step.batch, tokens, strict=True):
            if request.finish is None:
                request.position += 1
                self._advance(request, token)
        self._leave()

    def _launch(self, batch: list[Request]) -> Step:
        logits = self.decoder.decode(
            [r.last for r in batch], [r.position for r in batch], [r.row for r in batch]
        )
        return Step(batch, self._sample(logits, batch), self._bank_version)

    def _launch_again(self, step: Step) -> Step:
        """The step after `step` over the same rows, fed its sampled tokens without waiting for them."""
        step.copy_to_host()
        top = max(r.position for r in step.batch) + 1
        logits = self.decoder.decode_again(step.sampled, top)
        return Step(step.batch, self._sample(logits, step.batch), step.version)

    def _goes_on(self, step: Step) -> bool:
        """Whether every row of this step will want the next one too (unless it samples a stop token or
        is cancelled): they are the running rows, in order, none at its last token or the end of its
        slot, and the bank has moved no adapter since the step's adapter rows were looked up."""
        batch = step.batch
        if len(batch) != len(self.active) or any(a is not b for a, b in zip(batch, self.active, strict=True)):
            return False
        if self.bank is not None and self.bank.version != step.version:
            return False
        return all(r.generated + 1 < r.max_tokens and r.position + 1 < self.max_len for r in batch)

    def _advance(self, request: Request, token: int) -> None:
        """Hand a request its new token; one that is done gets its finish reason (it leaves at _leave)."""
        request.generated += 1
        self.tokens += 1
        if token in request.stop_ids:
            request.finish, token = "stop", None
        elif request.generated >= request.max_tokens or request.position >= self.max_len:
            request.finish = "length"
        elif request.cancelled:
            request.finish = "cancelled"
        if token is not None:
            request.emit(token, None)
            request.last = token
        if request.finish:
            request.emit(None, request.finish)

    # ---- slots ----------------------------------------------------------------------------------------

    def _join(self, request: Request, holders: dict[int, Request]) -> None:
        """A prefilled request takes slot n (the end of the decoding rows), swapping with whoever holds it
        (holders: slot → prefilling request, kept up to date)."""
        target = len(self.active)
        holders.pop(request.slot, None)
        if request.slot != target:
            holder = holders.pop(target, None)
            cache = self.decoder.cache
            if holder is not None:  # through the scratch slot
                cache.move(target, cache.scratch)
                cache.move(request.slot, target)
                cache.move(cache.scratch, request.slot)
                holder.slot = request.slot
                holders[holder.slot] = holder
            else:
                cache.move(request.slot, target)
                self._free.add(request.slot)
                self._free.discard(target)
            request.slot = target
        self.active.append(request)

    def _leave(self) -> None:
        """Finished requests leave the decoding rows; the last row moves into each freed slot."""
        for i in reversed(range(len(self.active))):
            if self.active[i].finish is None:
                continue
            end = len(self.active) - 1
            if i != end:
                self.decoder.cache.move(end, i)
                self.active[i] = self.active[end]
                self.active[i].slot = i
            self.active.pop()
            self._free.add(end)

    def _release(self, requests: list[Request], finish: str | None) -> None:
        """Prefilling requests give their slots back (with a last event when finish is given)."""
        for request in requests:
            self.prefilling.remove(request)
            self._free.add(request.slot)
            if finish:
                request.emit(None, finish)

    def _fail(self, requests: list[Request], err: Exception) -> None:
        self.failed_steps += 1
        self.last_failure = f"{type(err).__name__}: {str(err)[:300]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory step leaves its blocks cached
        for request in requests:
            request.emit(None, "error")

    # ---- sampling -----------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        return sample(logits, requests, self.generator)


def _default_slots(model: torch.nn.Module, length: int) -> int:
    """CPU_SLOTS on a CPU; on a GPU as many slots as GPU_SHARE of the free memory holds, up to GPU_SLOTS."""
    weight = next(p for p in model.parameters() if p.is_floating_point())
    if weight.device.type != "cuda":
        return CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(weight.device)
    per_slot = SlotCache.bytes_per_slot(model.config, length, weight.dtype)
    return max(1, min(GPU_SLOTS, int(GPU_SHARE * free) // per_slot))
