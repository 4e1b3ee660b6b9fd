"""The two flows of issue 38 that ended in "trained on another base model", served for real: the
README's Example adapter (top-16) in a server whose bank holds the top 64, and an adapter trained and
compressed by the command line — each answers over HTTP what it answers alone. The model is wide enough
(hidden 256) that a top-16 basis was once a randomized SVD's, the bank's an exact one."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from sigmatune import SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.cli import main
from sigmatune.commands import build_server
from sigmatune.hub.loading import load_model
from sigmatune.serving.routes import serve_in_thread
from tests.models import randomize, save_tiny_chat_model

WIDE = dict(hidden_size=256, intermediate_size=320)
ROWS = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(60)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("same-base")
    texts = [f"{r['input']} {r['output']}" for r in ROWS] + ["system user assistant"]
    save_tiny_chat_model(root / "model", texts, **WIDE)
    example = get_sigma_model(load_model(str(root / "model"))[0], SigmaConfig(rank=16))  # the README's
    randomize(example, scale=0.3)
    example.save_pretrained(root / "adapters" / "example")
    (root / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    common = ["--model", str(root / "model"), "--data", str(root / "parity.jsonl"), "--heldout", "10"]
    train = ["train", *common, "--rank", "16", "--steps", "3", "--eval-accuracy", "2", "--lr", "0.05"]
    assert main([*train, "--output-dir", str(root / "trained")]) == 0
    compress = ["compress", str(root / "trained"), str(root / "adapters" / "small"), "--rank", "8"]
    assert main([*compress, "--calibrate", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def client(workspace):
    state, engine = build_server(
        str(workspace / "model"), str(workspace / "adapters"), 64, "cpu", "float32", 4, None
    )
    url, stop = serve_in_thread(state)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop()
    engine.stop()


def greedy_alone(workspace, adapter: str, prompt: str, tokens: int) -> str:
    base, tokenizer = load_model(str(workspace / "model"))
    model = SigmaModel.from_pretrained(base, workspace / "adapters" / adapter)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", ["example", "small"])
def test_each_adapter_is_served_and_answers_what_it_answers_alone(adapter, client, workspace):
    assert {m.id for m in client.models.list().data} >= {"base", "example", "small"}
    prompt = "Is 12 even? Is 7"
    answer = client.completions.create(model=adapter, prompt=prompt, max_tokens=6, temperature=0)
    assert answer.choices[0].text == greedy_alone(workspace, adapter, prompt, 6)
