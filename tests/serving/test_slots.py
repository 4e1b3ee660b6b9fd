"""The slot KV cache: its attention (prefill in chunks, then decode steps with rows at different
positions, grouped-query heads) gives the plain model's logits, in fp64; and the engine's limits."""

from __future__ import annotations

import threading

import pytest
import torch

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.serving.decoder import SlotDecoder
from sigmatune.serving.engine import Engine, Request
from tests.models import tiny_llama, token_batch


def test_chunked_prefill_and_decode_over_slots_equal_the_plain_model():
    model = tiny_llama(dtype=torch.float64)  # 4 query heads over 2 key heads: grouped-query attention
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    bank = AdapterBank.over(model, SigmaConfig(rank=4, svd="exact"))
    decoder = SlotDecoder(bank.model.base_model, bank, slots=4, length=64, graphs=False)
    prompts = [token_batch(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 11), (2, 5), (3, 8))]
    slots = [3, 0, 2]  # any slots; prefilled in two chunks of different lengths, left-padded together
    first = decoder.prefill([(s, 0, p[:4], 0) for s, p in zip(slots, prompts, strict=True)])
    rest = decoder.prefill([(s, 4, p[4:], 0) for s, p in zip(slots, prompts, strict=True)])
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            plain = model(torch.tensor([prompt])).logits[0].double()
            torch.testing.assert_close(first[b], plain[3].float(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(rest[b], plain[-1].float(), rtol=1e-6, atol=1e-6)
    decoder.cache.move(0, 1)  # decoding rows sit in slots 0…n−1: row b in slot b
    decoder.cache.move(3, 0)
    texts = [list(p) for p in prompts]
    for step in range(3):  # rows at positions 11, 5 and 8 (then 12, 6, 9, …) in one step
        fed = [(7 * step + b) % 96 for b in range(3)]
        logits = decoder.decode(fed, [len(t) for t in texts], [0, 0, 0])
        for b, text in enumerate(texts):
            text.append(fed[b])
            with torch.no_grad():
                plain = model(torch.tensor([text])).logits[0, -1].float()
            torch.testing.assert_close(logits[b], plain, rtol=1e-6, atol=1e-6)


def test_limits_name_the_fix_and_a_full_slot_ends_with_length():
    bank = AdapterBank.over(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    engine = Engine(bank, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="larger max_len"):
        engine.submit(Request(list(range(16)), "base", 4, print))
    with pytest.raises(ValueError, match="1 to 15 tokens"):
        engine.submit(Request([], "base", 4, print))
    events = []
    engine.start()
    try:
        done = threading.Event()

        def emit(token, finish):
            events.append((token, finish))
            if finish:
                done.set()

        engine.submit(Request(list(range(1, 11)), "base", 100, emit))
        assert done.wait(timeout=60)
    finally:
        engine.stop()
    tokens = [t for t, f in events if t is not None]
    assert events[-1] == (None, "length") and len(tokens) == 16 - 10 + 1  # positions 10…15 fed, then full


def test_a_sliding_window_shorter_than_the_slots_is_refused_with_the_fix():
    model = tiny_llama()
    model.config.sliding_window = 8  # as a Mistral-style config would say
    with pytest.raises(ValueError, match="max_len ≤ 8"):
        Engine(model, max_batch=2, max_len=16)
    assert Engine(model, max_batch=2, max_len=8).max_len == 8
