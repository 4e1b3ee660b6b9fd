"""`sigmatune serve`: an OpenAI-compatible HTTP server over a base model and a folder of adapters.

    POST /v1/completions, /v1/chat/completions (stream or not)   `model` = "base", an adapter name,
    GET  /v1/models                                                or a mix "mix:a=0.7,b=0.3"
    POST /v1/adapters {"name": ...}   hot-load <adapters>/<name>;   DELETE /v1/adapters/<name>
    GET  /health, /metrics (Prometheus text)

Requests from all clients decode together in one continuous batch (engine.py), each row with its
own adapter from the AdapterBank. Errors are OpenAI-style JSON with 4xx codes; nothing a client
sends reaches a file path outside the adapters folder.

Hostile clients (tests/test_server_hostile.py): everything is checked (api_input.py) before it reaches
the engine thread, where a failing step would fail every request in it: a non-empty prompt, an adapter
that is in the bank when the request is submitted, mix weights that are finite and bounded. An adapter
serving requests cannot be unloaded (409); a client that hangs up ends its request at the engine's
next step; a body must arrive within body_seconds (408); slow clients wait on the event loop
without blocking anyone (see http_server for uvicorn's limits).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapter_file import WEIGHTS_NAME, read_adapter
from .api_input import (
    BODY_SECONDS,
    NAME,
    ApiError,
    is_message,
    json_body,
    parse_mix,
    sampling_params,
    unless_hung_up,
)
from .bank import BASE, AdapterBank
from .engine import Engine
from .engine import Request as EngineRequest

MAX_MIXES = 64  # mixes kept in the bank; past that the oldest idle one goes (clients make them at will)
HTTP_SETTINGS = dict(  # uvicorn's, see http_server
    timeout_keep_alive=5,  # s an idle keep-alive connection is kept
    limit_concurrency=512,  # connections + requests at once; past it 503 (bounds the engine's queue too)
    h11_max_incomplete_event_size=16 * 1024,  # bytes of request line + headers (400 past it)
    timeout_graceful_shutdown=10,  # s a shutdown waits for open requests before cancelling them
)


class Server:
    """The state behind the app: engine, bank, tokenizer, adapters folder, counters."""

    def __init__(
        self, engine: Engine, tokenizer, adapters_dir: str | Path | None = None, max_tokens: int = 512
    ):
        self.engine, self.bank, self.tokenizer = engine, engine.bank, tokenizer
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.context = getattr(engine.model.config, "max_position_embeddings", 2048)
        self.max_tokens = max_tokens
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
            if name not in self.bank.names():
                self._make_room_for_a_mix()
                self.bank.add_mix(name, weights)
            return name
        if name in self.bank.names():
            return name
        folder = self._folder(name)
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
        folder = self._folder(name)
        if folder is None:
            raise ApiError(400, f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only", "name")
        try:
            self.bank.load(name, folder, replace=name in self.bank.rows)
        except (ValueError, KeyError) as err:
            raise ApiError(400, f"cannot load adapter {name!r}: {err}", "name", "adapter_invalid") from None

    def unload(self, name: str) -> None:
        if name == BASE or not (NAME.fullmatch(name) or name.startswith("mix:")):
            raise ApiError(
                400, f"cannot unload {name!r}: give an adapter (letters, digits, '.', '_', '-')", "name"
            )
        if self.in_use[name]:
            raise ApiError(
                409,
                f"adapter {name!r} is serving {self.in_use[name]} requests; unload it when they finish",
                "name",
                "adapter_in_use",
            )
        try:
            self.bank.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} in the bank", "name", "model_not_found") from None

    def _make_room_for_a_mix(self) -> None:
        mixes = list(self.bank.mixes)  # oldest first
        if len(mixes) < MAX_MIXES:
            return
        idle = [mix for mix in mixes if not self.in_use[mix]]
        if not idle:
            raise ApiError(429, f"{MAX_MIXES} mixes are serving requests; retry later", "model")
        self.bank.remove(idle[0])

    def _folder(self, name: str) -> Path | None:
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
            params["temperature"],
            params["top_p"],
            self.stop_ids,
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


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="sigmatune", docs_url=None, redoc_url=None, redirect_slashes=False)

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        server.counts[f"errors_{err.status}"] += 1
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def crash(_, err: Exception):
        return ApiError(500, f"internal error: {type(err).__name__}: {err}").response()

    @app.get("/health")
    async def health():
        return {
            "status": "ok" if server.engine.error is None else "error",
            "active": len(server.engine.active),
            "waiting": server.engine.waiting.qsize(),
            "adapters": len(server.bank.names()) - 1,
            "failed_steps": server.engine.failed_steps,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        lines = [
            f"sigmatune_requests_total {server.counts['requests']}",
            f"sigmatune_generated_tokens_total {server.counts['tokens']}",
            f"sigmatune_active_requests {len(server.engine.active)}",
            f"sigmatune_waiting_requests {server.engine.waiting.qsize()}",
            f"sigmatune_resident_adapters {len(server.bank.rows)}",
            f"sigmatune_bank_bytes {server.bank.memory_bytes()}",
            f"sigmatune_engine_steps_total {server.engine.steps}",
            f"sigmatune_engine_failed_steps_total {server.engine.failed_steps}",
        ]
        lines += [
            f'sigmatune_errors_total{{status="{k[7:]}"}} {v}'
            for k, v in server.counts.items()
            if k.startswith("errors_")
        ]
        return "\n".join(lines) + "\n"

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "sigmatune"}
            for n in server.bank.names()
        ]
        if server.adapters_dir is not None:
            on_disk = sorted(p.name for p in server.adapters_dir.iterdir() if (p / WEIGHTS_NAME).is_file())
            known = set(server.bank.names())
            data += [
                {"id": n, "object": "model", "created": created, "owned_by": "sigmatune"}
                for n in on_disk
                if n not in known
            ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await json_body(request, server.body_seconds)
        name = body.get("name")
        if not isinstance(name, str) or server._folder(name) is None:
            raise ApiError(400, 'give {"name": <an adapter folder inside the adapters folder>}', "name")
        if not (server._folder(name) / WEIGHTS_NAME).exists():
            raise ApiError(404, f"no adapter folder {name!r}", "name", "model_not_found")
        started = time.perf_counter()
        await asyncio.to_thread(server.load, name)
        return {
            "id": name,
            "object": "model",
            "loaded": True,
            "seconds": round(time.perf_counter() - started, 4),
        }

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        server.unload(name)
        return {"id": name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, server.body_seconds)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string (or a list of one)", "prompt")
        ids = await asyncio.to_thread(lambda: server.tokenizer(prompt, add_special_tokens=True).input_ids)
        return await _answer(server, request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request, server.body_seconds)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(is_message(m) for m in messages):
            raise ApiError(400, "`messages` must be a non-empty list of {role, content: string}", "messages")

        def encode():  # in a thread: a 1 MiB body takes ~1 s to tokenize, and the event loop serves everyone
            text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return server.tokenizer(text, add_special_tokens=False).input_ids

        return await _answer(server, request, body, await asyncio.to_thread(encode), chat=True)

    return app


async def _answer(server: Server, request: Request, body: dict, prompt_ids: list[int], chat: bool):
    server.counts["requests"] += 1
    server.resolve(body.get("model"))  # a 404 or 400 now, before a stream starts
    params = sampling_params(
        body, len(prompt_ids), server.context, default_tokens=server.max_tokens if chat else 16
    )
    label, created, rid = (
        body["model"],
        int(time.time()),
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
    )
    kind = "chat.completion" if chat else "text_completion"
    if params["stream"]:

        async def events():
            first = True
            async for delta, finish, _ in server.generate(prompt_ids, label, params):
                if chat:
                    piece = {"role": "assistant", "content": delta} if first else {"content": delta}
                    choice = {"index": 0, "delta": piece, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
                first = False
                chunk = {
                    "id": rid,
                    "object": f"{kind}.chunk" if chat else kind,
                    "created": created,
                    "model": label,
                }
                yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")  # it stops when the client goes
    pieces = await unless_hung_up(request, _all(server.generate(prompt_ids, label, params)))
    text, (_, finish, count) = "".join(p[0] for p in pieces), pieces[-1]
    choice = {"index": 0, "finish_reason": finish}
    choice.update(
        {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
    )
    usage = {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": count,
        "total_tokens": len(prompt_ids) + count,
    }
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": label,
        "choices": [choice],
        "usage": usage,
    }


async def _all(pieces) -> list:
    return [piece async for piece in pieces]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def bank_plan(adapter_dirs: list[Path]) -> dict[str, list[int]]:
    """Layer → the union of the singular-value indices the adapters select (the bank's bases)."""
    plan: dict[str, set[int]] = {}
    for folder in adapter_dirs:
        for layer, saved in read_adapter(folder).layers.items():
            plan.setdefault(layer, set()).update(saved.indices.tolist())
    return {layer: sorted(indices) for layer, indices in plan.items()}


def build_server(
    model: str,
    adapters: str | None,
    rank: int | None,
    device: str,
    dtype: str,
    max_batch: int,
    max_resident: int | None,
):
    """(Server, Engine) over a base model and the adapter folders inside `adapters`."""
    from .config import SigmaConfig
    from .data import load_model
    from .model import SigmaModel
    from .train import resolve_device

    chosen, torch_dtype = resolve_device(device, dtype)
    base, tokenizer = load_model(model, torch_dtype, chosen)
    folders = sorted(p for p in Path(adapters).iterdir() if (p / WEIGHTS_NAME).is_file()) if adapters else []
    sigma_model = SigmaModel(base)
    config = SigmaConfig(rank=rank or 16)
    plan = sigma_model.plan(config) if rank or not folders else {}
    for layer, indices in bank_plan(folders).items():
        plan[layer] = sorted(set(plan.get(layer, [])) | set(indices))
    sigma_model.ensure_bases(config, plan, pin=True)
    bank = AdapterBank(sigma_model, max_resident=max_resident)
    for folder in folders:
        bank.load(folder.name, folder)
    engine = Engine(bank, max_batch=max_batch).start()
    return Server(engine, tokenizer, adapters), engine


def http_server(app: FastAPI, **where) -> uvicorn.Server:
    """uvicorn over the app with HTTP_SETTINGS; `where` is host= and port=, or run(sockets=[...]) it.

    What those settings leave to the asyncio event loop: a client that sends its request slowly (a
    byte at a time) only holds its own connection while everyone else is served; uvicorn has no timeout
    for headers, so each such client keeps one connection (of limit_concurrency) until it stops, and its
    body must arrive within Server.body_seconds. Facing the internet, put a proxy with header timeouts in
    front. Headers over h11_max_incomplete_event_size and malformed HTTP get uvicorn's own plain-text 400.
    """
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", **HTTP_SETTINGS, **where))


def serve_in_thread(server: Server, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """Serve on a free port of `host` from a background thread (tests, benchmarks): (base URL, stop)."""
    sock = socket.socket()
    sock.bind((host, 0))
    http = http_server(create_app(server))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not http.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)

    def stop() -> None:
        http.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}", stop


def serve(
    model: str = "smollm2",
    adapters: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    rank: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 32,
    max_resident: int | None = None,
) -> None:
    """Run the server until interrupted (uvicorn with HTTP_SETTINGS: see http_server)."""
    server, engine = build_server(model, adapters, rank, device, dtype, max_batch, max_resident)
    print(
        f"serving {model} with {len(server.bank.names()) - 1} adapters on http://{host}:{port}/v1", flush=True
    )
    try:
        http_server(create_app(server), host=host, port=port).run()
    finally:
        engine.stop()
