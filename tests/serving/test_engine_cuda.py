"""On a GPU: the graphed engine (steps launched ahead) gives the tokens of the eager one, and a hot-load
between steps takes effect at the next replay without a new capture."""

from __future__ import annotations

import pytest
import torch

from sigmatune import AdapterBank, get_sigma_model
from sigmatune.serving.engine import Engine, Request
from tests.models import randomize, tiny_llama, token_batch
from tests.serving.test_bank import ADAPTERS, BANK, saved  # noqa: F401  (fixture)
from tests.serving.test_engine import sampled_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_bank(saved):  # noqa: F811
    bank = AdapterBank.over(tiny_llama().cuda(), BANK)
    for name, folder in saved.items():
        bank.load(name, folder)
    return bank


def run(engine: Engine, jobs: list[tuple[str, list[int], int]]) -> list[list[int]]:
    """Greedy tokens per job (adapter, prompt, max tokens), all submitted at once, driven step by step."""
    outputs = [[] for _ in jobs]
    for out, (adapter, prompt, max_tokens) in zip(outputs, jobs, strict=True):
        engine.submit(Request(prompt, adapter, max_tokens, lambda t, f, out=out: t is None or out.append(t)))
    while not engine.idle():
        engine.step()
    return outputs


def test_graphed_decode_equals_eager(saved):  # noqa: F811
    bank = cuda_bank(saved)
    jobs = [
        (name, token_batch(seed=20 + i, batch=1, length=3 + 2 * i)[0].tolist(), 6 + 3 * i)
        for i, name in enumerate(["wide", "base", "attn", "mlp", "wide"])
    ]
    graphed = Engine(bank, max_batch=8, graphs=True)  # and steps launched ahead (look-ahead, CUDA's default)
    eager = Engine(bank, max_batch=8, graphs=False, look_ahead=False)
    assert graphed.look_ahead
    assert run(graphed, jobs) == run(eager, jobs)
    assert graphed.decoder.captures > 0 and eager.decoder.captures == 0


def test_a_hot_load_between_steps_takes_effect_without_recapture(saved, tmp_path):  # noqa: F811
    bank = cuda_bank(saved)
    engine = Engine(bank, max_batch=4, graphs=True)
    prompt = token_batch(seed=7, batch=1, length=5)[0].tolist()
    before = run(engine, [("wide", prompt, 8)])
    captures = engine.decoder.captures
    other = get_sigma_model(tiny_llama(), ADAPTERS["wide"])
    randomize(other, seed=99, scale=0.3)
    other.save_pretrained(tmp_path)
    bank.load("wide", tmp_path, replace=True)  # the same row, new scales
    after = run(engine, [("wide", prompt, 8)])
    assert engine.decoder.captures == captures  # same buckets: replayed, not captured again
    reference = Engine(AdapterBank.over(tiny_llama().cuda(), BANK), max_batch=4, graphs=False)
    reference.bank.load("wide", tmp_path)
    assert after == run(reference, [("wide", prompt, 8)]) and after != before


def test_graphed_decode_equals_eager_with_a_layer_of_bands(saved):  # noqa: F811
    """A layer whose table holds bands (served by the torch ops inside the graph) decodes as eager does."""
    bank = cuda_bank(saved)
    banded = "model.layers.0.mlp.up_proj"
    band = torch.zeros(3, bank.layers[banded].stored_rank)
    band[0, 1:], band[2, :-1] = 0.2, -0.1
    bank.tables.write(bank.row("wide"), {banded: band})  # that layer's table becomes a table of bands
    jobs = [
        (name, token_batch(seed=40 + i, batch=1, length=4 + i)[0].tolist(), 7)
        for i, name in enumerate(["wide", "attn"])
    ]
    graphed = Engine(bank, max_batch=4, graphs=True)
    eager = Engine(bank, max_batch=4, graphs=False)
    assert run(graphed, jobs) == run(eager, jobs)
    assert graphed.decoder.captures > 0


def test_a_seeded_request_samples_the_same_tokens_graphed_and_eager_alone_and_batched(saved):  # noqa: F811
    bank = cuda_bank(saved)

    def seeded():
        return Request([5, 6, 7, 8], "wide", 12, None, temperature=1.5, seed=77)

    others = [Request([9, 10 + i], "attn", 4 + i, None, temperature=1.0) for i in range(3)]
    alone = sampled_tokens(Engine(bank, max_batch=8, graphs=False, look_ahead=False), [seeded()])[0]
    graphed = sampled_tokens(Engine(bank, max_batch=8, graphs=True), [others[0], seeded(), *others[1:]])
    assert graphed[1] == alone and len(alone) == 12
