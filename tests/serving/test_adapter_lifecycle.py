"""Adapters coming and going on the running server (issue 38): a mix follows an adapter that is
reloaded (whatever way its weights were written), and a deleted adapter is gone until it is loaded
again by POST /v1/adapters. The real server over loopback, as in test_serve.py."""

from __future__ import annotations

import json
import shutil

import httpx

from tests.serving import test_serve
from tests.serving.test_serve import greedy_alone

workspace, server = test_serve.workspace, test_serve.server  # its fixtures (this module gets its own)
PROMPT = "Is 4 even?"


def complete(url: str, model: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def listed(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}


def test_a_mix_serves_the_reloaded_adapter_not_stale_weights(server, workspace):
    """Item 6: after replacing my-adapters/qa2 and POST /v1/adapters {"name": "qa2"}, `qa2` and every
    spelling of `mix:qa2=1` give the new answer (they gave the old one under some spellings)."""
    url, state = server
    folder = workspace / "adapters" / "qa2"
    shutil.copytree(workspace / "adapters" / "wide", folder)
    ids = state.tokenizer(PROMPT).input_ids
    old = greedy_alone(workspace, "qa2", ids, 8)
    for model in ("qa2", "mix:qa2=1", "mix:qa2=1.0"):
        assert complete(url, model).json()["choices"][0]["text"] == old, model
    shutil.rmtree(folder)
    shutil.copytree(workspace / "spare" / "late", folder)
    new = greedy_alone(workspace, "qa2", ids, 8)
    assert new != old  # else the test proves nothing
    assert httpx.post(url + "/v1/adapters", json={"name": "qa2"}, timeout=60).json()["loaded"] is True
    for model in ("qa2", "mix:qa2=1", "mix:qa2=1.0", "mix:qa2=1.000", "mix:qa2=1e0"):
        answer = complete(url, model).json()
        assert answer["choices"][0]["text"] == new, model
        assert answer["model"] == model  # the answer names the model as the client wrote it
    assert state.bank.mixes_of("qa2") == ["mix:qa2=1.0"]  # one row for the one mix, however spelled


def test_a_deleted_adapter_is_gone_until_it_is_loaded_again(server, workspace):
    url, _ = server
    shutil.copytree(workspace / "spare" / "late", workspace / "adapters" / "gone")
    shutil.copytree(workspace / "spare" / "late", workspace / "adapters" / "idle")
    assert complete(url, "gone").status_code == 200  # hot-loaded by name
    assert complete(url, "mix:gone=0.5,wide=0.5").status_code == 200
    assert {"gone", "idle"} <= listed(url)
    for name in ("gone", "idle"):  # loaded, or only on disk: both are listed, both can be deleted
        assert httpx.delete(f"{url}/v1/adapters/{name}", timeout=30).json() == {"id": name, "deleted": True}
    assert not any("gone" in name or "idle" in name for name in listed(url))
    for model in ("gone", "idle", "mix:gone=0.5,wide=0.5"):
        refused = complete(url, model)
        assert refused.status_code == 404, model
        assert "POST /v1/adapters" in refused.json()["error"]["message"]
    assert httpx.delete(url + "/v1/adapters/gone", timeout=30).status_code == 404  # already gone
    assert httpx.post(url + "/v1/adapters", json={"name": "gone"}, timeout=60).json()["loaded"] is True
    assert "gone" in listed(url) and complete(url, "gone").status_code == 200
    assert complete(url, "mix:gone=0.5,wide=0.5").status_code == 200


def test_an_adapter_whose_mix_is_serving_cannot_be_deleted(server):
    """Deleting an adapter drops its mixes, so a mix that is serving a request keeps it (409)."""
    url, state = server
    wanted = state.context - len(state.tokenizer(PROMPT).input_ids) - 2
    body = {"model": "mix:wide=1", "prompt": PROMPT, "max_tokens": wanted, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        refused = httpx.delete(url + "/v1/adapters/wide", timeout=30)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_in_use"
        assert "mix:wide=1.0" in refused.json()["error"]["message"]
        last = [json.loads(line[5:]) for line in lines if line.startswith("data: {")][-1]
    assert last["choices"][0]["finish_reason"] == "length"  # it ran to the end: the 409 was the mix's
    assert httpx.delete(url + "/v1/adapters/wide", timeout=30).json()["deleted"] is True
    assert httpx.post(url + "/v1/adapters", json={"name": "wide"}, timeout=60).json()["loaded"] is True
