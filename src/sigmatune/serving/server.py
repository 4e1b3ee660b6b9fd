"""The state behind `sigmatune serve`: the engine, the bank, the tokenizer and the adapters folder, and
what a request's `model` means — "base", an adapter name (hot-loaded from the folder) or a mix
"mix:a=0.7,b=0.3" — and the generation of one request as its tokens arrive. The HTTP endpoints over
it are in routes.py.

Adapters come and go: a mix is one bank row under its canonical name (AdapterBank.mix_name: "mix:b=1"
and "mix:b=1.0" are one row), rebuilt when one of its adapters is loaded again and dropped with it. An
adapter a client deletes (unload) is gone — not listed, not hot-loaded by name — until POST /v1/adapters
loads it again (`unloaded`, kept in memory: a restart serves the folder again). A request that gives no
temperature gets `temperature` (`sigmatune serve --temperature`, default 0: greedy).

Requests from all clients decode together in one continuous batch (engine.py), each row with its
own adapter from the AdapterBank. Errors are ApiErrors (OpenAI-style JSON with 4xx codes); nothing a
client sends reaches a file path outside the adapters folder.

Hostile clients (tests/serving/test_server_hostile.py): everything is checked (api_input.py) before it reaches
the engine thread, where a failing step would fail every request in it: a non-empty prompt, an adapter
that is in the bank when the request is submitted, mix weights that are finite and bounded. An adapter
serving requests cannot be unloaded (409); a client that hangs up ends its request at the engine's
next step; a body must arrive within body_seconds (408); slow clients wait on the event loop
without blocking anyone (see routes.http_server for uvicorn's limits).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from ..formats.adapter_file import WEIGHTS_NAME
from .api_input import BODY_SECONDS, NAME, ApiError, parse_mix
from .bank import BASE
from .engine import Engine
from .engine import Request as EngineRequest

MAX_MIXES = 64  # mixes kept in the bank; past that the oldest idle one goes (clients make them at will)


class Server:
    """The state behind the app: engine, bank, tokenizer, adapters folder, counters."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        adapters_dir: str | Path | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ):
        self.engine, self.bank, self.tokenizer = engine, engine.bank, tokenizer
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.context = engine.max_len  # positions of an engine slot: prompt + answer
        self.max_tokens = max_tokens
        self.temperature = temperature  # for requests that give none (OpenAI's own default is 1)
        self.unloaded: set[str] = set()  # adapters a client deleted: not served by name until loaded again
        self.body_seconds = BODY_SECONDS
        self.counts = Counter()
        self.in_use = Counter()  # adapter → requests the engine still holds (it cannot be unloaded meanwhile)
        self.stop_ids = frozenset(_eos_ids(engine.model, tokenizer))

    # ---- model names ------------------------------------------------------------------------------------

    def resolve(self, name) -> str:
        """The bank name for a request's `model`: base, an adapter (hot-loaded from the folder), or a mix."""
        if not isinstance(name, str) or not name:
            raise ApiError(400, "`model` must be a non-empty string", "model")
        if name.startswith("mix:"):
            weights = parse_mix(name)
            for part in weights:
                self.resolve(part)
            key = self.bank.mix_name(weights)
            if key not in self.bank.names():
                self._make_room_for_a_mix()
                self.bank.add_mix(key, weights)
            return key
        if name in self.bank.names():
            return name
        if name in self.unloaded:
            raise ApiError(
                404,
                f"the adapter {name!r} was unloaded (DELETE /v1/adapters/{name}); "
                f'POST /v1/adapters {{"name": "{name}"}} loads it again',
                "model",
                "model_not_found",
            )
        folder = self.folder_of(name)
        if folder is None or not (folder / WEIGHTS_NAME).exists():
            raise ApiError(
                404,
                f"the model {name!r} does not exist; GET /v1/models lists them",
                "model",
                "model_not_found",
            )
        self.load(name)
        return name

    def load(self, name: str) -> None:
        """Load (or reload) the adapter folder `name` of the adapters folder into the bank."""
        folder = self.folder_of(name)
        if folder is None:
            raise ApiError(400, f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only", "name")
        try:
            self.bank.load(name, folder, replace=name in self.bank.rows)
        except (ValueError, KeyError) as err:
            raise ApiError(400, f"cannot load adapter {name!r}: {err}", "name", "adapter_invalid") from None
        self.unloaded.discard(name)

    def unload(self, name: str) -> None:
        """Drop an adapter (and its mixes) or a mix from the bank (409 while one of them serves requests);
        an adapter is then gone until `load` (an adapter folder that was only on disk, too)."""
        if name == BASE or not (NAME.fullmatch(name) or name.startswith("mix:")):
            raise ApiError(
                400, f"cannot unload {name!r}: give an adapter (letters, digits, '.', '_', '-')", "name"
            )
        if name.startswith("mix:"):
            name = self.bank.mix_name(parse_mix(name, "name"))
        for held in [name, *self.bank.mixes_of(name)]:
            if self.in_use[held]:
                raise ApiError(
                    409,
                    f"{held!r} is serving {self.in_use[held]} requests; unload {name!r} when they finish",
                    "name",
                    "adapter_in_use",
                )
        if name in self.bank.names():
            self.bank.remove(name)
        elif name.startswith("mix:") or name not in self.on_disk():  # on_disk leaves out the unloaded
            raise ApiError(404, f"no adapter {name!r} is served", "name", "model_not_found")
        if not name.startswith("mix:"):
            self.unloaded.add(name)

    def on_disk(self) -> list[str]:
        """The adapter folders in the adapters folder, by name (loaded or not), but those unloaded."""
        if self.adapters_dir is None:
            return []
        folders = (p.name for p in self.adapters_dir.iterdir() if (p / WEIGHTS_NAME).is_file())
        return sorted(name for name in folders if name not in self.unloaded)

    def _make_room_for_a_mix(self) -> None:
        mixes = list(self.bank.mixes)  # oldest first
        if len(mixes) < MAX_MIXES:
            return
        idle = [mix for mix in mixes if not self.in_use[mix]]
        if not idle:
            raise ApiError(429, f"{MAX_MIXES} mixes are serving requests; retry later", "model")
        self.bank.remove(idle[0])

    def folder_of(self, name: str) -> Path | None:
        """The adapter folder a client's name means: a plain name inside the adapters folder, else None."""
        if self.adapters_dir is None or not NAME.fullmatch(name):
            return None
        folder = (self.adapters_dir / name).resolve()
        return folder if folder.parent == self.adapters_dir else None

    # ---- generation -------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], model: str, params: dict):
        """Yields (text delta, finish reason or None, tokens so far) as tokens arrive; the last has a reason.

        `model` is resolved again right before the engine gets the request (an unload or a mix eviction may
        have come since the request was checked); from then until the engine's last event for it, the
        adapter is in_use. Leaving early (a stop string, a client gone) ends the request at the next step."""
        adapter = self.resolve(model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(token, finish):
            loop.call_soon_threadsafe(events.put_nowait, (token, finish))
            if finish is not None:
                loop.call_soon_threadsafe(self._release, adapter)

        request = EngineRequest(
            prompt_ids,
            adapter,
            params["max_tokens"],
            emit,
            self.temperature if params["temperature"] is None else params["temperature"],
            params["top_p"],
            self.stop_ids,
            seed=params["seed"],
        )
        self.engine.submit(request)
        self.in_use[adapter] += 1
        tokens, sent, stops = [], "", params["stop"]
        hold = (
            max((len(s) for s in stops), default=1) - 1
        )  # characters kept back: a stop string may be forming
        try:
            while True:
                token, finish = await events.get()
                if token is not None:
                    tokens.append(token)
                    self.counts["tokens"] += 1
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                if finish == "error":
                    raise ApiError(500, f"generation failed: {self.engine.error or self.engine.last_failure}")
                ready = text if finish else text[: max(len(sent), len(text) - hold)]
                if ready.endswith("\ufffd") and not finish:  # half of a multi-byte character
                    ready = sent
                if len(ready) > len(sent) or finish:
                    yield ready[len(sent) :], ("stop" if finish == "cancelled" else finish), len(tokens)
                    sent = ready
                if finish:
                    return
        finally:
            self.engine.cancel(request)  # its last event, which frees its adapter, comes at the next step

    def _release(self, adapter: str) -> None:
        self.in_use[adapter] -= 1
        if self.in_use[adapter] <= 0:
            del self.in_use[adapter]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
