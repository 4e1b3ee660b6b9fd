"""Continuous batching: requests that join and leave a running batch, each with its own adapter,
produce exactly what the adapter produces alone (greedy), through prefill, cache merges and decode."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sigmatune.serving.engine import Engine, Request
from tests.models import tiny_llama, token_batch
from tests.serving.test_bank import alone, bank, saved  # noqa: F401  (fixtures)

EOS = 2  # tiny_llama's end-of-sequence id


class Collector:
    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def __call__(self, token, finish):
        if token is not None:
            self.tokens.append(token)
        if finish is not None:
            self.finish = finish
            self.done.set()


def assert_greedy_for(folder, prompt, tokens, max_tokens, finish, eos=EOS):
    """Every token the engine chose is the adapter's own greedy choice (its logit within 1e-4 of the
    best: random tiny models have near ties that batch shapes may break either way)."""
    logits = alone(folder, torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :]  # (len(tokens) + 1, V)
    for step, token in enumerate(tokens):
        assert logits[step, token] >= logits[step].max() - 1e-4, (step, token)
        assert token != eos
    if finish == "length":
        assert len(tokens) == max_tokens
    else:  # stopped: the next greedy token was the end of sequence
        assert logits[len(tokens), EOS] >= logits[len(tokens)].max() - 1e-4


@pytest.mark.parametrize("look_ahead", [False, True])
def test_joining_and_leaving_requests_match_each_adapter_alone(bank, saved, look_ahead):  # noqa: F811
    engine = Engine(bank, max_batch=4, look_ahead=look_ahead).start()
    try:
        plan = [  # (adapter, prompt length, max tokens, delay before submitting)
            ("wide", 5, 12, 0.0),
            ("base", 9, 6, 0.0),
            ("attn", 3, 10, 0.05),
            ("mlp", 7, 4, 0.1),
            ("wide", 4, 9, 0.15),
            ("attn", 11, 7, 0.2),
        ]
        jobs = []
        for i, (adapter, length, max_tokens, delay) in enumerate(plan):
            time.sleep(delay - (plan[i - 1][3] if i else 0.0))
            prompt = token_batch(seed=10 + i, batch=1, length=length)[0].tolist()
            collector = Collector()
            engine.submit(Request(prompt, adapter, max_tokens, collector, stop_ids=frozenset({EOS})))
            jobs.append((adapter, prompt, max_tokens, collector))
        for adapter, prompt, max_tokens, collector in jobs:
            assert collector.done.wait(timeout=60), "request never finished"
            assert collector.finish in ("stop", "length")
            assert_greedy_for(saved.get(adapter), prompt, collector.tokens, max_tokens, collector.finish)
        assert engine.steps > 0 and engine.error is None and not engine.active
    finally:
        engine.stop()


@pytest.mark.parametrize("look_ahead", [False, True])
def test_cancel_and_sampling(bank, look_ahead):  # noqa: F811
    engine = Engine(bank, max_batch=8, seed=1, look_ahead=look_ahead).start()
    try:
        long = Collector()
        request = engine.submit(Request([5, 6, 7], "wide", 10_000, long))
        sampled = Collector()
        engine.submit(Request([8, 9], "mlp", 6, sampled, temperature=0.8, top_p=0.9))
        assert sampled.done.wait(timeout=60) and len(sampled.tokens) == 6
        assert all(0 <= t < 96 for t in sampled.tokens)
        engine.cancel(request)
        assert long.done.wait(timeout=60) and long.finish == "cancelled" and len(long.tokens) < 10_000
    finally:
        engine.stop()


def test_a_failing_prefill_fails_only_its_requests_and_the_engine_goes_on(bank, saved):  # noqa: F811
    engine = Engine(bank, max_batch=8).start()
    try:
        prompt = token_batch(seed=3, batch=1, length=6)[0].tolist()
        running = Collector()  # decoding when the bad request arrives (no stop token: it runs 56 steps)
        engine.submit(Request(prompt, "attn", 56, running))
        while not running.tokens:
            time.sleep(0.01)
        bad, running_then = Collector(), []

        def bad_emit(token, finish):  # notes how far the running request was when the failure came
            running_then.append(len(running.tokens))
            bad(token, finish)

        engine.submit(
            Request([5, 10**6], "wide", 4, bad_emit)
        )  # a token id past the vocabulary: prefill raises
        assert bad.done.wait(timeout=60) and bad.finish == "error"
        assert engine.failed_steps == 1 and "IndexError" in engine.last_failure and engine.error is None
        assert running_then[0] < 56  # it was still running when the prefill failed
        assert running.done.wait(timeout=60) and running.finish == "length"  # and it went on, untouched
        assert_greedy_for(saved.get("attn"), prompt, running.tokens, 56, "length", eos=None)
        after = Collector()  # and the engine serves the next request exactly
        engine.submit(Request(prompt, "wide", 8, after, stop_ids=frozenset({EOS})))
        assert after.done.wait(timeout=60) and after.finish in ("stop", "length")
        assert_greedy_for(saved.get("wide"), prompt, after.tokens, 8, after.finish)
    finally:
        engine.stop()


def test_a_failing_decode_step_fails_the_batch_and_the_engine_goes_on(bank, saved, monkeypatch):  # noqa: F811
    engine = Engine(bank, max_batch=8).start()
    try:
        running = Collector()
        engine.submit(Request([5, 6, 7], "wide", 10_000, running))
        while not running.tokens:
            time.sleep(0.01)
        real = engine._sample

        def broken(logits, requests):  # one decode step fails, as an out-of-memory would
            monkeypatch.setattr(engine, "_sample", real)
            raise torch.OutOfMemoryError("simulated: no memory for this step")

        monkeypatch.setattr(engine, "_sample", broken)
        assert running.done.wait(timeout=60) and running.finish == "error"
        assert engine.failed_steps == 1 and "OutOfMemoryError" in engine.last_failure and not engine.active
        prompt = token_batch(seed=4, batch=1, length=5)[0].tolist()
        after = Collector()
        engine.submit(Request(prompt, "mlp", 6, after, stop_ids=frozenset({EOS})))
        assert after.done.wait(timeout=60) and after.finish in ("stop", "length")
        assert_greedy_for(saved.get("mlp"), prompt, after.tokens, 6, after.finish)
    finally:
        engine.stop()


@pytest.mark.parametrize("look_ahead", [False, True])
def test_prompts_prefilled_in_chunks_between_decode_steps_match_each_adapter_alone(bank, saved, look_ahead):  # noqa: F811
    """Prompts longer than a chunk (3 tokens) prefill over several turns while others decode, and join
    the decoding rows out of order (slots swap); requests wait for a slot when all 3 are taken."""
    engine = Engine(bank, max_batch=3, prefill_tokens=3, look_ahead=look_ahead)
    jobs = []
    for i, (adapter, length, max_tokens) in enumerate(
        [("wide", 10, 5), ("attn", 2, 9), ("mlp", 7, 3), ("base", 5, 6), ("wide", 1, 4), ("mlp", 12, 2)]
    ):
        prompt = token_batch(seed=40 + i, batch=1, length=length)[0].tolist()
        collector = Collector()
        engine.submit(Request(prompt, adapter, max_tokens, collector, stop_ids=frozenset({EOS})))
        jobs.append((adapter, prompt, max_tokens, collector))
    turns = 0
    while not engine.idle():
        engine.step()
        turns += 1
        assert len(engine.active) + len(engine.prefilling) <= 3
        assert [r.slot for r in engine.active] == list(range(len(engine.active)))
    assert turns > 6
    for adapter, prompt, max_tokens, collector in jobs:
        assert collector.done.is_set() and collector.finish in ("stop", "length")
        assert_greedy_for(saved.get(adapter), prompt, collector.tokens, max_tokens, collector.finish)


def test_an_engine_over_a_plain_model_serves_the_base_and_refuses_adapters():
    model = tiny_llama()
    engine = Engine(model, max_batch=2)
    prompt = token_batch(seed=9, batch=1, length=6)[0].tolist()
    base, named = Collector(), Collector()
    engine.submit(Request(prompt, "base", 7, base))
    engine.submit(Request(prompt, "qa", 7, named))
    while not engine.idle():
        engine.step()
    assert named.finish == "error" and "only 'base'" in engine.last_failure
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)[0, 6:]
    assert base.tokens == expected.tolist()


def test_look_ahead_steps_from_the_device_tokens_and_drops_what_ended(bank, saved, monkeypatch):  # noqa: F811
    """With look-ahead, steady decoding launches each step from the last one's tokens before the host has
    them; rows that stop (end of sequence), reach max_tokens or fill their slot meanwhile lose only a
    dropped token, and every request still gets exactly its adapter's greedy answer."""
    engine = Engine(bank, max_batch=4, max_len=24, look_ahead=True)
    again = []
    real = engine.decoder.decode_again
    monkeypatch.setattr(engine.decoder, "decode_again", lambda *a: again.append(1) or real(*a))
    plan = [  # (prompt seed, adapter, prompt length, max tokens, stop id): seed 60 meets EOS after 5 tokens
        (60, "wide", 6, 30, None),
        (60, "wide", 6, 30, EOS),
        (62, "attn", 4, 9, EOS),
        (63, "base", 3, 12, None),
    ]
    jobs = []
    for seed, adapter, length, max_tokens, stop in plan:
        prompt = token_batch(seed=seed, batch=1, length=length)[0].tolist()
        collector = Collector()
        stops = frozenset() if stop is None else frozenset({stop})
        engine.submit(Request(prompt, adapter, max_tokens, collector, stop_ids=stops))
        jobs.append((adapter, prompt, max_tokens, stop, collector))
    while not engine.idle():
        engine.step()
    assert len(again) > 5  # most steps were launched ahead
    finishes = [c.finish for *_, c in jobs]
    assert finishes[0] == "length" and len(jobs[0][-1].tokens) == 24 - 6 + 1  # its slot filled first
    assert "stop" in finishes and finishes[-1] == "length"
    for adapter, prompt, max_tokens, stop, collector in jobs:
        limit = len(collector.tokens) if collector is jobs[0][-1] else max_tokens
        assert_greedy_for(saved.get(adapter), prompt, collector.tokens, limit, collector.finish, eos=stop)
    assert not engine.active and engine._ahead is None and engine.error is None


def sampled_tokens(engine: Engine, requests: list[Request]) -> list[list[int]]:
    """The tokens of each request, all submitted at once and driven step by step (no engine thread)."""
    outputs = [[] for _ in requests]
    for out, request in zip(outputs, requests, strict=True):
        request.emit = lambda t, f, out=out: t is None or out.append(t)
        engine.submit(request)
    while not engine.idle():
        engine.step()
    return outputs


@pytest.mark.parametrize("look_ahead", [False, True])
def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(bank, look_ahead):  # noqa: F811
    """Issue 38: `seed` draws from the request's own generator, so the batch around it changes nothing."""

    def seeded(seed=77):
        return Request([5, 6, 7, 8], "wide", 12, None, temperature=1.5, top_p=0.95, seed=seed)

    def other(i):
        return Request(token_batch(seed=i, batch=1, length=3 + i)[0].tolist(), "mlp", 5 + i, None, 1.0)

    alone = sampled_tokens(Engine(bank, max_batch=8, look_ahead=look_ahead), [seeded()])[0]
    crowd = sampled_tokens(
        Engine(bank, max_batch=8, seed=5, look_ahead=look_ahead), [other(1), seeded(), other(2), other(3)]
    )
    assert crowd[1] == alone and len(alone) == 12
    others = sampled_tokens(Engine(bank, max_batch=8), [seeded(seed) for seed in range(4)])
    assert len({tuple(tokens) for tokens in others}) > 1  # the seed chooses the draw
