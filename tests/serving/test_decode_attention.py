"""The decode-attention kernel (Triton; on CPU in its interpreter) against the plain softmax attention in
fp64: rows of different lengths, grouped-query heads, padded head dims; and the slot decoder through it
equals the plain model."""

from __future__ import annotations

import pytest
import torch

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.ops import switches
from sigmatune.serving.decoder import SlotDecoder
from sigmatune.serving.ops import decode_attention
from tests.models import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(decode_attention.triton is None, reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)


def reference(query, keys, values, lengths, scale):
    """The plain attention, fp64: row b's query heads over the first lengths[b] positions of slot b."""
    batch, heads, _ = query.shape
    group = heads // keys.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        k = keys[b, :n].double().repeat_interleave(group, dim=1)  # (n, H, D)
        v = values[b, :n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "dim", "tolerance"),
    [
        (torch.float32, 4, 2, 16, 1e-5),
        (torch.float32, 6, 1, 24, 1e-5),  # a group of 6 (padded to 16 rows), a head dim of 24 (to 32)
        (torch.float32, 2, 2, 16, 1e-5),  # no grouping
        (torch.bfloat16, 8, 2, 32, 2e-2),
    ],
)
def test_kernel_equals_plain_attention(dtype, heads, kv_heads, dim, tolerance):
    generator = torch.Generator().manual_seed(heads * dim)
    slots, length = 5, 40
    keys = torch.randn(slots + 1, length, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(slots + 1, length, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.tensor([1, 17, 40, 16, 33])  # one position, a block boundary (16 interpreted), full
    batch = len(lengths)
    query = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    on = [t.to(DEVICE) for t in (query, keys, values, lengths)]
    out = decode_attention.decode_attention(*on, scale).cpu()
    assert out.shape == (batch, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), reference(query, keys, values, lengths, scale), rtol=tolerance, atol=tolerance
    )


def test_a_strided_query_gives_the_same_out():
    generator = torch.Generator().manual_seed(3)
    keys, values = (torch.randn(3, 20, 2, 16, generator=generator).to(DEVICE) for _ in range(2))
    lengths = torch.tensor([20, 5], device=DEVICE)
    wide = torch.randn(2, 1, 4, 16, generator=generator).transpose(1, 2)  # (B, H, 1, D) over (B, 1, H, D)
    wide = wide.to(DEVICE)
    out = decode_attention.decode_attention(wide[:, :, 0], keys, values, lengths, 0.25)
    dense = decode_attention.decode_attention(wide[:, :, 0].contiguous(), keys, values, lengths, 0.25)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    expected = reference(wide[:, :, 0].cpu(), keys.cpu(), values.cpu(), lengths.cpu(), 0.25)
    torch.testing.assert_close(out.cpu().double(), expected)


def test_mismatched_heads_are_refused():
    keys = torch.zeros(2, 8, 3, 16)
    with pytest.raises(ValueError, match="query heads"):
        decode_attention.decode_attention(torch.zeros(1, 4, 16), keys, keys, torch.tensor([1]), 1.0)


@pytest.fixture
def interpreted():
    with switches.interpreted():  # CPU: the interpreted kernel serves the decode steps
        yield


def test_slot_decoder_through_the_kernel_equals_the_plain_model(interpreted, monkeypatch):
    calls, kernel = [], decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    model = tiny_llama().to(DEVICE)  # 4 query heads over 2 key heads
    bank = AdapterBank.over(model, SigmaConfig(rank=4, svd="exact"))
    decoder = SlotDecoder(bank.model.base_model, bank, slots=2, length=64, graphs=False)
    prompts = [token_batch(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 9), (2, 4))]
    decoder.prefill([(b, 0, p, 0) for b, p in enumerate(prompts)])
    texts = [list(p) for p in prompts]
    for step in range(2):
        fed = [(5 * step + b) % 96 for b in range(2)]
        logits = decoder.decode(fed, [len(t) for t in texts], [0, 0])
        for b, text in enumerate(texts):
            text.append(fed[b])
            with torch.no_grad():
                plain = model(torch.tensor([text], device=DEVICE)).logits[0, -1].float()
            torch.testing.assert_close(logits[b], plain, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * model.config.num_hidden_layers  # every layer of both steps, not the prefill


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_on_cuda_at_a_served_shape(dtype):
    """The 1.1B Llama's heads (32 over 4 key heads, head dim 64), 256 positions, lengths across blocks."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, length = 64, 256
    keys, values = (
        torch.randn(batch + 1, length, 4, 64, generator=generator, device="cuda").to(dtype) for _ in range(2)
    )
    lengths = torch.randint(1, length + 1, (batch,), generator=generator, device="cuda")
    lengths[:3] = torch.tensor([1, 64, 256])
    query = torch.randn(batch, 32, 64, generator=generator, device="cuda").to(dtype)
    assert decode_attention.available(query)
    out = decode_attention.decode_attention(query, keys, values, lengths, 0.125)
    expected = reference(query.cpu(), keys.cpu(), values.cpu(), lengths.cpu(), 0.125)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tolerance, atol=tolerance)
