"""The OpenAI request fields beyond the basics (issue 38), through the real server and the official
`openai` client: the default temperature, `seed`, content given as a list of parts, `stream_options`,
and the fields this server does not implement, refused with a 400 that names them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from sigmatune.cli import build_parser
from tests.serving import test_serve

workspace, server = test_serve.workspace, test_serve.server  # its fixtures (this module gets its own)
client = test_serve.client
ASK = [{"role": "user", "content": "Is 7 even?"}]


def text(answer) -> str:
    return answer.choices[0].message.content


def test_a_request_without_temperature_is_greedy_and_one_with_it_samples(client):
    greedy = text(client.chat.completions.create(model="wide", messages=ASK, max_tokens=12, temperature=0))
    for _ in range(3):  # the server's default (--temperature 0): the same greedy answer every time
        assert text(client.chat.completions.create(model="wide", messages=ASK, max_tokens=12)) == greedy
    sampled = {
        text(client.chat.completions.create(model="wide", messages=ASK, max_tokens=12, temperature=2.0))
        for _ in range(4)
    }
    assert sampled - {greedy}  # a temperature given is honoured


def test_the_serve_command_takes_a_default_temperature():
    assert build_parser().parse_args(["serve"]).temperature == 0.0
    assert build_parser().parse_args(["serve", "--temperature", "0.7"]).temperature == 0.7


def test_a_seed_makes_sampling_reproducible_alone_and_in_a_batch(client):
    def ask(seed, prompt="Is 7 even?"):
        return (
            client.completions.create(model="wide", prompt=prompt, max_tokens=16, temperature=1.5, seed=seed)
            .choices[0]
            .text
        )

    alone = ask(1234)
    assert ask(1234) == alone
    with ThreadPoolExecutor(8) as pool:  # the same request among others that sample at the same time
        crowd = list(pool.map(lambda i: ask(1234) if i % 2 else ask(None, f"Is {i}?"), range(16)))
    assert crowd[1::2] == [alone] * 8
    assert len({ask(seed) for seed in range(6)}) > 1  # the seed chooses the draw


def test_content_as_a_list_of_text_parts(client, server):
    parts = [{"type": "text", "text": "Is 7"}, {"type": "text", "text": "even?"}]
    joined = [{"role": "user", "content": "Is 7\neven?"}]
    as_parts = client.chat.completions.create(
        model="wide", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    assert text(as_parts) == text(
        client.chat.completions.create(model="wide", messages=joined, max_tokens=8, temperature=0)
    )
    image = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="wide", messages=[{"role": "user", "content": [parts[0], image]}], max_tokens=2
        )
    assert "image_url" in refused.value.message and refused.value.body["param"] == "messages"


def test_stream_options_include_usage_ends_with_a_usage_chunk(client):
    whole = client.chat.completions.create(model="wide", messages=ASK, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="wide",
            messages=ASK,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *deltas, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in deltas)
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == text(whole)
    plain = list(client.completions.create(model="wide", prompt="Is 3", max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)  # without stream_options: no usage chunk, as OpenAI


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "top_logprobs", 3),
        ("/v1/completions", "logprobs", 2),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", "end"),
        ("/v1/chat/completions", "frequency_penalty", 0.5),
        ("/v1/chat/completions", "presence_penalty", -1),
        ("/v1/completions", "logit_bias", {"5": 100}),
        ("/v1/chat/completions", "modalities", ["text", "audio"]),
        ("/v1/chat/completions", "stream_options", {"include_usage": True}),  # without stream
    ],
)
def test_fields_the_server_does_not_implement_are_refused_by_name(server, path, field, value):
    body = {"model": "wide", "max_tokens": 2, field: value}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": ASK})
    reply = httpx.post(server[0] + path, json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
    assert f"`{field}`" in reply.json()["error"]["message"]


def test_fields_that_ask_for_nothing_are_accepted(client):
    answer = client.chat.completions.create(
        model="wide",
        messages=ASK,
        max_tokens=2,
        temperature=0,
        logprobs=False,
        response_format={"type": "text"},
        user="someone",
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        metadata={"run": "1"},
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
