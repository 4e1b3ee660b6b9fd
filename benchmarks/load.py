"""Does the real server answer every request whole under mixed traffic with hot-loads and unloads, and how fast?
A load test on a loopback socket, bounded, stopping by itself.

    python benchmarks/load.py [--requests 300] [--duration 60] [--concurrency 16] [--model PATH] [--device cpu]

The server is built as `sigmatune serve` builds it (build_server, uvicorn with its settings) on a free
127.0.0.1 port, over a tiny chat Llama made from a config (the tests' model: seeded weights and a BPE
tokenizer trained on a few lines; no download) or over --model, with ADAPTERS
random adapters saved to a temp folder. --concurrency client threads send --requests requests, or as many
as --duration seconds allow: completions and chats, streamed or not, over the base model, the adapters,
two mixes and the latest hot-loaded adapter. Every HOT_EVERY-th request copies a new adapter folder into
the adapters folder and hot-loads it (POST /v1/adapters); the one after unloads the previous hot adapter
(DELETE, retried while it is serving requests: 409). An answer counts when its status is 200 and its body
is whole (a stream ends with [DONE]); anything else is a failure, and the script exits 1 if there is one.
Latencies are those of the generation requests. Rows are merged into results/load.json by (model, device,
concurrency); a markdown table is printed.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import common
import httpx
import torch

from sigmatune import SigmaConfig, get_sigma_model

sys.path.insert(0, str(Path(__file__).parents[1]))  # for the tests' tiny chat model
from tests.models import save_tiny_chat_model


def internals() -> SimpleNamespace:
    """The sigmatune internals this script uses, in one place."""
    from sigmatune.commands import build_server
    from sigmatune.hub.loading import load_model
    from sigmatune.serving.routes import serve_in_thread

    return SimpleNamespace(build_server=build_server, serve_in_thread=serve_in_thread, load_model=load_model)


ADAPTERS, RANK, HOT_EVERY, MAX_TOKENS = 4, 8, 25, 12
TEXTS = [f"Is {n} even? {'yes' if n % 2 == 0 else 'no'}" for n in range(60)] + ["system user assistant"]
MODELS = [
    "base",
    "a0",
    "a1",
    "a2",
    "a3",
    "mix:a0=0.5,a1=0.5",
    "mix:a1=0.3,a2=0.7",
    "hot",
]  # "hot": the latest
KEY = ("model", "device", "concurrency")
COLUMNS = [
    "requests_sent", "answered", "failed", "hot_loads", "duration_s", "requests_per_s", "latency_p50_ms",
    "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "device", "model", "concurrency",
]  # fmt: skip


def prepare(ops, root: Path, model: str | None) -> str:
    """The base model's folder (the tiny one, saved under root, unless `model`); ADAPTERS random adapters
    a0… under root/adapters and one more, the source of the hot-loaded copies, as root/spare."""
    model = model or str(save_tiny_chat_model(root / "model", TEXTS))
    for i in range(ADAPTERS + 1):
        sigma = get_sigma_model(ops.load_model(model)[0], SigmaConfig(rank=RANK))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in sigma.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
        sigma.save_pretrained(root / "adapters" / f"a{i}" if i < ADAPTERS else root / "spare")
    return model


class Load:
    """The traffic: each client thread runs client(), which sends requests 0, 1, … (shared) until `count` or
    the deadline; send(i) makes request i and records what came back."""

    def __init__(self, url: str, root: Path, count: int, deadline: float):
        self.url, self.root, self.count, self.deadline = url, root, count, deadline
        self.next = iter(range(count))
        self.http = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=256))
        self.lock = threading.Lock()
        self.sent = self.answered = self.failed = self.hot_loads = self.unloads = 0
        self.latencies: list[float] = []  # s, generation requests
        self.hot: list[str] = []  # hot-loaded adapters, latest last
        self.errors: list[str] = []

    def client(self) -> None:
        while time.monotonic() < self.deadline:
            with self.lock:
                i = next(self.next, None)
            if i is None:
                return
            self.send(i)

    def send(self, i: int) -> None:
        started = time.monotonic()
        try:
            if i % HOT_EVERY == HOT_EVERY - 1:
                ok, what = self.hot_load(f"hot{i}"), "hot-load"
            elif i % HOT_EVERY == 0 and i > HOT_EVERY:
                ok, what = self.unload(f"hot{i - HOT_EVERY - 1}"), "unload"  # the one before the latest
            else:
                ok, what = self.generate(i), "generate"
        except Exception as err:  # a refused connection, a timeout, a body that is not what it should be
            ok, what = f"{type(err).__name__}: {err}", "request"
        with self.lock:
            self.sent += 1
            if ok is True:
                self.answered += 1
                self.unloads += what == "unload"
                if what == "generate":
                    self.latencies.append(time.monotonic() - started)
            else:
                self.failed += 1
                self.errors.append(f"{what} {i}: {ok}")

    def generate(self, i: int) -> bool | str:
        model = MODELS[i % len(MODELS)]
        model = (self.hot[-1] if self.hot else "base") if model == "hot" else model
        chat, stream = [(False, False), (True, False), (False, True), (True, True)][i // len(MODELS) % 4]
        body = {"model": model, "max_tokens": 4 + i % (MAX_TOKENS - 3), "temperature": 0.7 * (i % 2)}
        if chat:
            body["messages"] = [{"role": "user", "content": f"Is {i} even?"}]
        else:
            body["prompt"] = f"Is {i} even?"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if not stream:
            reply = self.http.post(path, json=body)
            whole = reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in (
                "stop",
                "length",
            )
            return whole or f"{model}: {reply.status_code} {reply.text[:200]}"
        with self.http.stream("POST", path, json={**body, "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line]
        whole = reply.status_code == 200 and lines[-1:] == ["data: [DONE]"]
        return whole or f"{model} (stream): {reply.status_code} {lines[-1:]}"

    def hot_load(self, name: str) -> bool | str:
        shutil.copytree(self.root / "spare", self.root / "adapters" / name)  # a new folder, during the run
        reply = self.http.post("/v1/adapters", json={"name": name})
        if reply.status_code != 200 or reply.json().get("loaded") is not True:
            return f"{reply.status_code} {reply.text[:200]}"
        with self.lock:
            self.hot.append(name)
            self.hot_loads += 1
        return True

    def unload(self, name: str) -> bool | str:
        """DELETE once its hot-load has answered (it may still be on its way), retried while it serves (409)."""
        while name not in self.hot or (reply := self.http.delete(f"/v1/adapters/{name}")).status_code == 409:
            if time.monotonic() > self.deadline + 30:
                return f"{name} is still loading or serving requests"
            time.sleep(0.05)
        return reply.status_code == 200 or f"{reply.status_code} {reply.text[:200]}"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    options = common.parser(__doc__, out="load.json")
    options.set_defaults(device="cpu")  # the server's own figures: a GPU is not what this measures
    options.add_argument("--requests", type=int, default=1000, help="requests to send (a fixed count)")
    options.add_argument("--duration", type=float, default=60.0, help="seconds after which no request starts")
    options.add_argument("--concurrency", type=int, default=16, help="client threads")
    options.add_argument("--model", help="a model folder (default: a tiny Llama built from a config)")
    args = options.parse_args()
    ops = internals()
    root = Path(tempfile.mkdtemp(prefix="sigmatune-load-"))
    try:
        model = prepare(ops, root, args.model)
        state, engine = ops.build_server(model, str(root / "adapters"), RANK, args.device, "auto", 32, None)
        url, stop = ops.serve_in_thread(state)
        started = time.monotonic()
        load = Load(url, root, args.requests, started + args.duration)
        with ThreadPoolExecutor(args.concurrency) as pool:
            for client in [pool.submit(load.client) for _ in range(args.concurrency)]:
                client.result()
        duration = time.monotonic() - started
        health = httpx.get(url + "/health", timeout=10).json()
        stop()
        engine.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if health["status"] != "ok" or health["active"] != 0:
        load.failed += 1
        load.errors.append(f"after the run: {health}")
    ms = [1000 * s for s in load.latencies] or [0.0]
    row = dict(
        requests_sent=load.sent, answered=load.answered, failed=load.failed, hot_loads=load.hot_loads,
        duration_s=round(duration, 2), requests_per_s=round(load.answered / duration, 1),
        latency_p50_ms=round(percentile(ms, 50), 1), latency_p90_ms=round(percentile(ms, 90), 1),
        latency_p99_ms=round(percentile(ms, 99), 1), latency_max_ms=round(max(ms), 1),
        device=common.device_name(engine.device),
        model=args.model or "tiny-llama (config)", concurrency=args.concurrency,
    )  # fmt: skip
    print(markdown(common.merge_rows(args.out, [row], KEY)))
    print(f"{load.hot_loads} hot-loads, {load.unloads} unloads, {health}")
    for error in load.errors[:20]:
        print("FAILED", error)
    sys.exit(1 if load.failed else 0)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
