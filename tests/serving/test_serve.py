"""The OpenAI-compatible server, run for real (uvicorn on a loopback socket) and called by the
official `openai` client and by raw HTTP: answers, streaming, errors, hot-load, concurrency."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from sigmatune import SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.commands import build_server
from sigmatune.hub.loading import load_model
from sigmatune.serving.routes import serve_in_thread
from tests.models import randomize, save_tiny_chat_model

TEXTS = [f"Is {n} even? {'yes' if n % 2 == 0 else 'no'}" for n in range(60)] + ["system user assistant"]
ADAPTERS = {"wide": SigmaConfig(rank=8), "attn": SigmaConfig(rank=4, target_modules=["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_chat_model(root / "model", TEXTS)
    for seed, (name, config) in enumerate([*ADAPTERS.items(), ("late", SigmaConfig(rank=6))]):
        model = get_sigma_model(load_model(str(root / "model"))[0], config)
        randomize(model, seed=seed, scale=0.4)
        model.save_pretrained(root / ("spare" if name == "late" else "adapters") / name)
    return root


@pytest.fixture(scope="module")
def server(workspace):
    state, engine = build_server(
        str(workspace / "model"), str(workspace / "adapters"), 8, "cpu", "float32", 8, None
    )
    url, stop = serve_in_thread(state)  # uvicorn with the settings `sigmatune serve` uses
    yield url, state
    stop()
    engine.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def greedy_alone(workspace, adapter, prompt_ids, max_tokens):
    base, tokenizer = load_model(str(workspace / "model"))
    model = SigmaModel.from_pretrained(base, workspace / "adapters" / adapter) if adapter != "base" else base
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_models_and_completions_match_the_adapter_alone(client, workspace, server):
    names = {m.id for m in client.models.list().data}
    assert {"base", "wide", "attn"} <= names
    tokenizer = server[1].tokenizer
    for adapter in ("wide", "attn", "base"):
        answer = client.completions.create(model=adapter, prompt="Is 12 even?", max_tokens=6, temperature=0)
        ids = tokenizer("Is 12 even?").input_ids
        assert answer.choices[0].text == greedy_alone(workspace, adapter, ids, 6)
        assert answer.usage.prompt_tokens == len(ids) and answer.choices[0].finish_reason in (
            "stop",
            "length",
        )


def test_chat_and_streaming_agree(client):
    messages = [{"role": "user", "content": "Is 7 even?"}]
    whole = client.chat.completions.create(model="wide", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="wide", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="attn", prompt="Is 3", max_tokens=5, temperature=0, stream=True
        )
    )
    assert (
        text
        == client.completions.create(model="attn", prompt="Is 3", max_tokens=5, temperature=0).choices[0].text
    )


def test_mix_and_stop_strings(client):
    mixed = client.completions.create(
        model="mix:wide=0.5,attn=0.5", prompt="Is 5 even?", max_tokens=6, temperature=0
    )
    assert mixed.model == "mix:wide=0.5,attn=0.5" and isinstance(mixed.choices[0].text, str)
    full = (
        client.completions.create(model="wide", prompt="Is 2", max_tokens=12, temperature=0).choices[0].text
    )
    if len(full) > 3:
        stop = full[2:4]
        cut = client.completions.create(
            model="wide", prompt="Is 2", max_tokens=12, temperature=0, stop=[stop]
        ).choices[0]
        assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"model": "../adapters/wide", "prompt": "x"}, 404, "does not exist"),
        ({"model": "wide", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": "wide", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "wide", "prompt": "x", "max_tokens": 10_000}, 400, "exceeds the context"),
        ({"model": "wide", "prompt": "yes " * 200}, 400, "context"),
        ({"model": "wide", "prompt": 7}, 400, "prompt"),
        ({"model": "wide", "prompt": "x", "n": 3}, 400, "n=1"),
        ({"model": "mix:wide=a", "prompt": "x"}, 400, "bad mix"),
    ],
)
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(
    server, client, body, status, fragment
):
    reply = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == status
    assert (
        fragment in reply.json()["error"]["message"]
        and reply.json()["error"]["type"] == "invalid_request_error"
    )
    assert client.completions.create(model="wide", prompt="Is 1 even?", max_tokens=2, temperature=0).choices


def test_malformed_bodies(server):
    for raw, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * (2 << 20), 413)]:
        reply = httpx.post(
            server[0] + "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert reply.status_code == status and "error" in reply.json()
    reply = httpx.post(
        server[0] + "/v1/chat/completions", json={"model": "wide", "messages": [{"role": "user"}]}, timeout=30
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert httpx.get(server[0] + "/v1/nothing", timeout=30).status_code == 404


def test_health_metrics_and_hot_load(server, client, workspace):
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    shutil.copytree(workspace / "spare" / "late", workspace / "adapters" / "late")
    loaded = httpx.post(server[0] + "/v1/adapters", json={"name": "late"}, timeout=60).json()
    assert loaded["loaded"] is True
    assert (
        client.completions.create(model="late", prompt="Is 9 even?", max_tokens=3, temperature=0)
        .choices[0]
        .text
        is not None
    )
    assert (
        httpx.post(server[0] + "/v1/adapters", json={"name": "../spare/late"}, timeout=30).status_code == 400
    )
    metrics = httpx.get(server[0] + "/metrics").text
    assert "sigmatune_requests_total" in metrics and "sigmatune_resident_adapters" in metrics
    assert "sigmatune_tokens_per_s " in metrics and "sigmatune_batch_occupancy " in metrics
    assert httpx.delete(server[0] + "/v1/adapters/late").json()["deleted"] is True


def test_many_concurrent_clients_with_a_hot_load_lose_nothing(server, client, workspace):
    shutil.copytree(workspace / "spare" / "late", workspace / "adapters" / "late2", dirs_exist_ok=True)
    models = ["wide", "attn", "base", "mix:wide=0.3,attn=0.7"]

    def one(i):
        if i == 20:  # a hot-load in the middle of the traffic
            return httpx.post(server[0] + "/v1/adapters", json={"name": "late2"}, timeout=60).json()["loaded"]
        kwargs = dict(model=models[i % len(models)], max_tokens=4 + i % 5, temperature=0 if i % 2 else 0.7)
        if i % 3 == 0:
            stream = client.completions.create(prompt=f"Is {i} even?", stream=True, **kwargs)
            return bool(list(stream))
        return client.chat.completions.create(
            messages=[{"role": "user", "content": f"Is {i}?"}], **kwargs
        ).choices[0].finish_reason in ("stop", "length")

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(40)))
    assert results == [True] * 40
    assert json.loads(httpx.get(server[0] + "/health").text)["active"] == 0
