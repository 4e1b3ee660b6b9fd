"""What clients send to the server, parsed and checked before anything reaches the engine thread.

Every problem is an ApiError: an OpenAI-style JSON error with a 4xx status naming the parameter.
Limits: a body of at most MAX_BODY bytes of UTF-8 JSON arriving within a deadline; adapter names are
plain names (no paths); a "mix:" spec has up to MAX_MIX_PARTS distinct adapters with finite, bounded
weights; sampling parameters are type- and range-checked (null means "not given", as in OpenAI's API).

OpenAI's fields, one by one: model, prompt (a string or a list of one), messages (content a string or a
list of text parts, joined by newlines as vLLM does), max_tokens / max_completion_tokens, temperature
(the server's default when not given), top_p, n (1), stop, stream, stream_options (include_usage), seed
(a per-request random stream: the same seed and prompt give the same answer whatever else is batched)
are served. UNSUPPORTED lists the ones that would change the answer and are not implemented (logprobs,
response_format other than text, tools, penalties, ...): a request that asks for one gets a 400 naming
it, and its "nothing" value (OpenAI's default, e.g. logprobs: false) is accepted. Fields that change no
answer (user, metadata, store, service_tier, parallel_tool_calls, ...) and names OpenAI does not have
are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .bank import BASE

MAX_BODY = 1 << 20  # bytes of JSON a request may send
BODY_SECONDS = 30.0  # a request body must arrive within this (a stalled upload gets 408)
DRAIN_BODY = 8 << 20  # an oversized body up to this is read and dropped before its 413 (see _too_large)
DRAIN_SECONDS = 2.0  # ... for at most this long
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # adapter names (fullmatch: "$" would let "a\n" in)
MAX_MIX_PARTS = 16  # adapters in one "mix:" spec
MAX_MIX_WEIGHT = 4.0  # mix weights lie in [0, MAX_MIX_WEIGHT]: a NaN or huge one would make NaN logits
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


UNSUPPORTED = {  # field → whether a value asks for nothing (null always does); any other value is a 400
    "logprobs": lambda v: v is False,
    "top_logprobs": _zero,
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
    "frequency_penalty": _zero,
    "presence_penalty": _zero,
    "logit_bias": lambda v: v == {},
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),  # without tools, "auto" calls none
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def sampling_params(body: dict, prompt_tokens: int, context: int, default_tokens: int) -> dict:
    """Sampling parameters, checked: a 400 naming the parameter for anything out of range (null = not given)."""
    body = {key: value for key, value in body.items() if value is not None}
    room = context - prompt_tokens
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt has no tokens", "prompt")
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
            "prompt",
            "context_length_exceeded",
        )
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", min(default_tokens, room)))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "`max_tokens` must be a positive integer", "max_tokens")
    if max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of {context}",
            "max_tokens",
            "context_length_exceeded",
        )
    for field, asks_nothing in UNSUPPORTED.items():
        if field in body and not asks_nothing(body[field]):
            raise ApiError(
                400,
                f"`{field}` is not supported by this server: leave it out (it answers plain text, sampled "
                "with temperature, top_p and seed)",
                field,
            )
    temperature, top_p = body.get("temperature"), body.get("top_p", 1.0)  # None: the server's default
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise ApiError(400, "`temperature` must be a number in [0, 2]", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError(400, "`top_p` must be a number in (0, 1]", "top_p")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", "stream")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEEDS[0] <= seed <= SEEDS[1]
    ):
        raise ApiError(400, f"`seed` must be an integer in [{SEEDS[0]}, {SEEDS[1]}]", "seed")
    return {
        "max_tokens": max_tokens,
        "temperature": None if temperature is None else float(temperature),
        "top_p": float(top_p),
        "stop": stop,
        "stream": stream,
        "include_usage": _include_usage(body.get("stream_options"), stream),
        "seed": seed,
    }


def _include_usage(options, stream: bool) -> bool:
    """stream_options {"include_usage": bool}, given only with stream: true (as OpenAI's API requires)."""
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "`stream_options` is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, '`stream_options` must be {"include_usage": true or false}', "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "`stream_options.include_usage` must be true or false", "stream_options")
    return usage


async def json_body(request: Request, seconds: float) -> dict:
    """The body as a JSON object: at most MAX_BODY bytes of UTF-8, arrived within `seconds`."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise await _too_large(request, seconds, drain=size.isdigit() and int(size) <= DRAIN_BODY)
    try:
        raw = await asyncio.wait_for(_body(request), seconds)
    except _Oversized:
        raise await _too_large(request, seconds, drain=True) from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {seconds:g} s") from None
    except ClientDisconnect:
        raise ApiError(499, "the client closed the connection") from None
    try:
        body = json.loads(raw.decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # fails on a lone surrogate ("\ud800")
    except (ValueError, RecursionError) as err:  # JSON, UTF-8 decode and encode errors are ValueErrors
        raise ApiError(400, f"the body is not valid JSON in UTF-8 ({type(err).__name__}: {err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class _Oversized(Exception):
    """The streamed body passed MAX_BODY."""


async def _body(request: Request) -> bytes:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise _Oversized
    return raw


async def _too_large(request: Request, seconds: float, drain: bool) -> ApiError:
    """The 413 for an oversized body, after reading and dropping what the client still sends of it (up to
    DRAIN_BODY bytes, within DRAIN_SECONDS): closing a socket with unread data makes the kernel send a reset,
    and a client that is still uploading then loses the answer instead of reading it (a lingering close, as
    web servers do). A declared length past DRAIN_BODY (or not a number) is answered at once, and so is a
    client waiting for "100 Continue": reading its body would invite the upload the 413 refuses."""
    if drain and request.headers.get("expect", "").lower() != "100-continue":
        await _drop_body(request, min(seconds, DRAIN_SECONDS))
    return ApiError(413, f"the request body is larger than {MAX_BODY} bytes")


async def _drop_body(request: Request, seconds: float) -> None:
    async def drop():
        dropped = 0
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > DRAIN_BODY:
                return

    with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect, RuntimeError):
        await asyncio.wait_for(drop(), seconds)


async def unless_hung_up(request: Request, work):
    """The result of the awaitable `work`, unless the client hangs up first: then work is cancelled (its
    engine request ends at the next step) and the answer is a 499 that nobody reads."""
    task, hangup = asyncio.ensure_future(work), asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():  # its cancellation runs at the loop's next turn
        raise ApiError(499, "the client closed the connection")
    return task.result()


async def _hung_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":  # the body was read: only this is left
        pass


def chat_messages(messages) -> list[dict]:
    """The chat's messages as the chat template takes them: {role, content: string}, content given as a
    string or as a non-empty list of text parts [{"type": "text", "text": ...}] (joined by newlines)."""
    shape = "`messages` must be a non-empty list of {role, content: a string or a list of text parts}"
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, shape, "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"{shape}; messages[{i}] is not", "messages")
        content = message.get("content")
        if isinstance(content, list) and content:
            content = "\n".join(
                _text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content)
            )
        if not isinstance(content, str):
            raise ApiError(400, f"{shape}; messages[{i}].content is not", "messages")
        out.append({**message, "content": content})
    return out


def _text_part(part, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind != "text":
        raise ApiError(
            400,
            f"{where} is a part of type {str(kind)[:50]!r}: this server serves a text model; send only "
            '{"type": "text", "text": ...} parts',
            "messages",
        )
    if not isinstance(part.get("text"), str):
        raise ApiError(400, f'{where} needs "text": a string', "messages")
    return part["text"]


def parse_mix(name: str, param: str = "model") -> dict[str, float]:
    """The weights of "mix:a=0.7,b=0.3", {a: 0.7, b: 0.3}: up to MAX_MIX_PARTS distinct adapters (not mixes),
    each weight a number in [0, MAX_MIX_WEIGHT] (NaN, inf or a huge weight would turn the logits into NaN).
    A 400 names `param` (where the client wrote the mix)."""
    bad = ApiError(
        400,
        f"bad mix {name[:200]!r}: write mix:<adapter>=<weight>,<adapter>=<weight> with up to "
        f"{MAX_MIX_PARTS} distinct adapters, each weight in [0, {MAX_MIX_WEIGHT:g}]",
        param,
    )
    parts = name.removeprefix("mix:").split(",")
    if len(parts) > MAX_MIX_PARTS:
        raise bad
    weights = {}
    for part in parts:
        adapter, _, weight = part.partition("=")
        adapter = adapter.strip()
        try:
            value = float(weight)
        except ValueError:
            raise bad from None
        if (
            adapter in weights
            or not (adapter == BASE or NAME.fullmatch(adapter))
            or not 0 <= value <= MAX_MIX_WEIGHT
        ):
            raise bad
        weights[adapter] = value
    return weights
