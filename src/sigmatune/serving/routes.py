"""The HTTP side of `sigmatune serve`: an OpenAI-compatible app over a Server (server.py), and uvicorn.

    POST /v1/completions, /v1/chat/completions (stream or not)   `model` = "base", an adapter name,
    GET  /v1/models                                                or a mix "mix:a=0.7,b=0.3"
    POST /v1/adapters {"name": ...}   hot-load <adapters>/<name>;   DELETE /v1/adapters/<name>
    GET  /health, /metrics (Prometheus text)

A route parses and checks its request (api_input.py), asks the Server, and shapes the answer as
OpenAI's API does (a JSON object, or server-sent events when streaming). Every error is an ApiError
turned into OpenAI-style JSON here; nothing a route raises escapes as a 500 without that shape.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..formats.adapter_file import WEIGHTS_NAME
from .api_input import ApiError, chat_messages, json_body, sampling_params, unless_hung_up
from .server import Server

HTTP_SETTINGS = dict(  # uvicorn's, see http_server
    timeout_keep_alive=5,  # s an idle keep-alive connection is kept
    limit_concurrency=512,  # connections + requests at once; past it 503 (bounds the engine's queue too)
    h11_max_incomplete_event_size=16 * 1024,  # bytes of request line + headers (400 past it)
    timeout_graceful_shutdown=10,  # s a shutdown waits for open requests before cancelling them
)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="sigmatune", docs_url=None, redoc_url=None, redirect_slashes=False)
    _error_handlers(app, server)
    _status_routes(app, server)
    _adapter_routes(app, server)
    _completion_routes(app, server)
    return app


def _error_handlers(app: FastAPI, server: Server) -> None:
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


def _status_routes(app: FastAPI, server: Server) -> None:
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
            f"sigmatune_prefilling_requests {len(server.engine.prefilling)}",
            *(f"sigmatune_{name} {value:.4g}" for name, value in server.engine.stats().items()),
        ]
        lines += [
            f'sigmatune_errors_total{{status="{k[7:]}"}} {v}'
            for k, v in server.counts.items()
            if k.startswith("errors_")
        ]
        return "\n".join(lines) + "\n"

    @app.get("/v1/models")
    async def models():
        created, served = int(time.time()), server.bank.names()
        known = set(served)
        names = served + [name for name in server.on_disk() if name not in known]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "sigmatune"} for n in names
            ],
        }


def _adapter_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await json_body(request, server.body_seconds)
        name = body.get("name")
        folder = server.folder_of(name) if isinstance(name, str) else None
        if folder is None:
            raise ApiError(400, 'give {"name": <an adapter folder inside the adapters folder>}', "name")
        if not (folder / WEIGHTS_NAME).exists():
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


def _completion_routes(app: FastAPI, server: Server) -> None:
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
        messages = chat_messages(body.get("messages"))

        def encode():  # in a thread: a 1 MiB body takes ~1 s to tokenize, and the event loop serves everyone
            text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return server.tokenizer(text, add_special_tokens=False).input_ids

        return await _answer(server, request, body, await asyncio.to_thread(encode), chat=True)


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
    chunk = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": label}
    if params["include_usage"]:
        chunk["usage"] = None  # on every chunk but the last, as OpenAI's API does
    if params["stream"]:

        async def events():
            first, usage = True, _usage(prompt_ids, 0)
            async for delta, finish, count in server.generate(prompt_ids, label, params):
                usage = _usage(prompt_ids, count)
                if chat:
                    piece = {"role": "assistant", "content": delta} if first else {"content": delta}
                    choice = {"index": 0, "delta": piece, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
                first = False
                yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"
            if params["include_usage"]:  # OpenAI's last chunk: no choices, the usage
                yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")  # it stops when the client goes
    pieces = await unless_hung_up(request, _all(server.generate(prompt_ids, label, params)))
    text, (_, finish, count) = "".join(p[0] for p in pieces), pieces[-1]
    choice = {"index": 0, "finish_reason": finish}
    choice.update(
        {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
    )
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": label,
        "choices": [choice],
        "usage": _usage(prompt_ids, count),
    }


def _usage(prompt_ids: list[int], count: int) -> dict:
    return {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": count,
        "total_tokens": len(prompt_ids) + count,
    }


async def _all(pieces) -> list:
    return [piece async for piece in pieces]


def http_server(app: FastAPI, **where) -> uvicorn.Server:
    """uvicorn over the app with HTTP_SETTINGS; `where` is host= and port=, or run(sockets=[...]) it.

    What those settings leave to the asyncio event loop: a client that sends its request slowly (a
    byte at a time) only holds its own connection while everyone else is served; uvicorn has no timeout
    for headers, so each such client keeps one connection (of limit_concurrency) until it stops, and its
    body must arrive within Server.body_seconds. Facing the internet, put a proxy with header timeouts in
    front. Headers over h11_max_incomplete_event_size and malformed HTTP get uvicorn's own plain-text 400.
    """
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", **HTTP_SETTINGS, **where))


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (port 0: a free port, see getsockname), for
    http_server(...).run(sockets=[it]); an OSError that names the address and the fix if it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        why = "the port is in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
        raise OSError(
            f"cannot listen on {host}:{port}: {why}; stop whatever listens there, or pick another "
            "address with --port (and --host)"
        ) from None
    return sock


def serve_in_thread(server: Server, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """Serve on a free port of `host` from a background thread (tests, benchmarks): (base URL, stop)."""
    sock = listening_socket(host, 0)
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
