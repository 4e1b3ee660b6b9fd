"""`sigmatune serve`: an OpenAI-compatible HTTP server over a base model and a folder of adapters.

    POST /v1/completions, /v1/chat/completions (stream or not)   `model` = "base", an adapter name,
    GET  /v1/models                                                or a mix "mix:a=0.7,b=0.3"
    POST /v1/adapters {"name": ...}   hot-load <adapters>/<name>;   DELETE /v1/adapters/<name>
    GET  /health, /metrics (Prometheus text)

Requests from all clients decode together in one continuous batch (engine.py), each row with its
own adapter from the AdapterBank. Errors are OpenAI-style JSON with 4xx codes; nothing a client
sends reaches a file path outside the adapters folder.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapter_file import WEIGHTS_NAME, read_adapter
from .bank import AdapterBank
from .engine import Engine
from .engine import Request as EngineRequest

MAX_BODY = 1 << 20  # bytes of JSON a request may send
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # adapter names: no paths


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class Server:
    """The state behind the app: engine, bank, tokenizer, adapters folder, counters."""

    def __init__(
        self, engine: Engine, tokenizer, adapters_dir: str | Path | None = None, max_tokens: int = 512
    ):
        self.engine, self.bank, self.tokenizer = engine, engine.bank, tokenizer
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.context = getattr(engine.model.config, "max_position_embeddings", 2048)
        self.max_tokens = max_tokens
        self.counts = Counter()
        self.stop_ids = frozenset(_eos_ids(engine.model, tokenizer))

    # ---- model names ------------------------------------------------------------------------------------

    def resolve(self, name) -> str:
        """The bank name for a request's `model`: base, an adapter (hot-loaded from the folder), or a mix."""
        if not isinstance(name, str) or not name:
            raise ApiError(400, "`model` must be a non-empty string", "model")
        if name.startswith("mix:"):
            weights = _parse_mix(name)
            for part in weights:
                self.resolve(part)
            if name not in self.bank.names():
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

    def _folder(self, name: str) -> Path | None:
        if self.adapters_dir is None or not NAME.match(name):
            return None
        folder = (self.adapters_dir / name).resolve()
        return folder if folder.parent == self.adapters_dir else None

    # ---- generation -------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], adapter: str, params: dict):
        """Yields (text delta, finish reason or None, tokens so far) as tokens arrive; the last has a reason."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(token, finish):
            loop.call_soon_threadsafe(events.put_nowait, (token, finish))

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
                    self.engine.cancel(request)
                if finish == "error":
                    raise ApiError(500, f"generation failed: {self.engine.error}")
                ready = text if finish else text[: max(len(sent), len(text) - hold)]
                if ready.endswith("\ufffd") and not finish:  # half of a multi-byte character
                    ready = sent
                if len(ready) > len(sent) or finish:
                    yield ready[len(sent) :], ("stop" if finish == "cancelled" else finish), len(tokens)
                    sent = ready
                if finish:
                    return
        finally:
            self.engine.cancel(request)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="sigmatune", docs_url=None, redoc_url=None)

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
        body = await _json(request)
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
        try:
            server.bank.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} in the bank", "name", "model_not_found") from None
        return {"id": name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "`prompt` must be a string (or a list of one string)", "prompt")
        ids = server.tokenizer(prompt, add_special_tokens=True).input_ids
        return await _answer(server, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise ApiError(400, "`messages` must be a non-empty list of {role, content: string}", "messages")
        text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = server.tokenizer(text, add_special_tokens=False).input_ids
        return await _answer(server, body, ids, chat=True)

    return app


async def _answer(server: Server, body: dict, prompt_ids: list[int], chat: bool):
    server.counts["requests"] += 1
    adapter = server.resolve(body.get("model"))
    params = _params(body, len(prompt_ids), server, default_tokens=server.max_tokens if chat else 16)
    label, created, rid = (
        body["model"],
        int(time.time()),
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
    )
    kind = "chat.completion" if chat else "text_completion"
    if params["stream"]:

        async def events():
            first = True
            async for delta, finish, _ in server.generate(prompt_ids, adapter, params):
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

        return StreamingResponse(events(), media_type="text/event-stream")
    pieces = [piece async for piece in server.generate(prompt_ids, adapter, params)]
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


def _params(body: dict, prompt_tokens: int, server: Server, default_tokens: int) -> dict:
    """Sampling parameters, checked: a 400 naming the parameter for anything out of range."""
    room = server.context - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; the model's context is {server.context}",
            "prompt",
            "context_length_exceeded",
        )
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", min(default_tokens, room)))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "`max_tokens` must be a positive integer", "max_tokens")
    if max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of {server.context}",
            "max_tokens",
            "context_length_exceeded",
        )
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise ApiError(400, "`temperature` must be a number in [0, 2]", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError(400, "`top_p` must be a number in (0, 1]", "top_p")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", "stream")
    return {
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "stop": stop,
        "stream": stream,
    }


async def _json(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _is_message(message) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def _parse_mix(name: str) -> dict[str, float]:
    weights = {}
    for part in name.removeprefix("mix:").split(","):
        adapter, _, weight = part.partition("=")
        try:
            weights[adapter.strip()] = float(weight)
        except ValueError:
            raise ApiError(
                400, f"bad mix {name!r}: write mix:<adapter>=<weight>,<adapter>=<weight>", "model"
            ) from None
    return weights


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
    """Run the server until interrupted."""
    import uvicorn

    server, engine = build_server(model, adapters, rank, device, dtype, max_batch, max_resident)
    print(
        f"serving {model} with {len(server.bank.names()) - 1} adapters on http://{host}:{port}/v1", flush=True
    )
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        engine.stop()
