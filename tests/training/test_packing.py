"""Packed batches (training/packing.py) against the padded batch they stand for: the same loss and the
same gradients (fp64), on a tiny real Llama with a chat template, adapted and not."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.training import packing
from sigmatune.training.data import Example
from sigmatune.training.evaluate import packs_exactly, token_loss
from sigmatune.training.packing import block_mask, can_pack, fits, pack, packed_loss
from sigmatune.training.tokens import IGNORE, collate, encode
from tests.models import randomize, tiny_llama, tiny_tokenizer

QUESTIONS = [
    ("Is 3 even?", "no"),
    ("Is 10 even?", "yes"),
    ("Is 7 odd, really?", "yes"),
    ("Is 0 even?", "yes"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer([f"{q} {a}" for q, a in QUESTIONS] + ["system user assistant Be brief."])


def chat_batch(tokenizer) -> list:
    return [encode(tokenizer, "Be brief.", Example(q, [a]), 64) for q, a in QUESTIONS]


def text_batch(tokenizer) -> list:  # plain text: every token taught, nothing shared
    return [encode(tokenizer, None, Example(None, [f"{q} {a}"]), 64) for q, a in QUESTIONS]


def test_a_packed_row_holds_the_shared_prefix_once(tokenizer):
    batch = chat_batch(tokenizer)
    packed = pack(batch)
    shared = int((packed.segments == -1).sum())
    assert shared > 5 and all(e.input_ids[:shared] == batch[0].input_ids[:shared] for e in batch)
    assert packed.tokens == shared + sum(len(e.input_ids) - shared for e in batch)
    labelled = sum(label != IGNORE for e in batch for label in e.labels[1:])
    assert packed.targets.numel() == labelled  # every label once, none lost or added
    # each example's tokens sit at the positions they have in the example
    rest = packed.position_ids[0][packed.segments == 1]
    assert rest.tolist() == list(range(shared, len(batch[1].input_ids)))
    mask = block_mask(packed.segments, torch.float32)[0, 0]
    first, second = (packed.segments == 0).nonzero()[0], (packed.segments == 1).nonzero()[0]
    assert mask[second, first] < -1e30 and mask[second, 0] == 0 and mask[0, 1] < -1e30  # own rows, causal


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("adapted", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_batch(tokenizer, kind, adapted):
    model = tiny_llama(vocab_size=len(tokenizer), dtype=torch.float64)
    if adapted:
        model = get_sigma_model(model, SigmaConfig(rank="full"))
        randomize(model, scale=0.1)
    else:
        model.requires_grad_(True)
    batch = chat_batch(tokenizer) if kind == "chat" else text_batch(tokenizer)
    trained = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(loss):
        return loss.detach(), torch.autograd.grad(loss, trained)

    padded, padded_grads = loss_and_grads(token_loss(model, collate(batch, tokenizer.pad_token_id))[0])
    packed, packed_grads = loss_and_grads(packed_loss(model, pack(batch))[0])
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)
    # the shared prefix's gradient is the sum of every example's, summed in another order; Llama's RMSNorm
    # computes in fp32 even in an fp64 model, so that order shows at fp32's rounding (~6e-8), no more
    for got, want in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_batch_too_long_to_pack_stays_padded(tokenizer, monkeypatch):
    batch = chat_batch(tokenizer)
    assert fits(batch)
    monkeypatch.setattr(packing, "MAX_TOKENS", sum(len(e.input_ids) for e in batch) - 1)
    assert not fits(batch)
    model = tiny_llama(vocab_size=len(tokenizer))
    assert not packs_exactly(model, batch, tokenizer.pad_token_id, "cpu")  # not used for such batches


def test_packing_is_checked_once_per_model(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), attention_dropout=0.5).train()  # compared without dropout
    assert can_pack(model) and packs_exactly(model, chat_batch(tokenizer), tokenizer.pad_token_id, "cpu")
    assert model.training  # left as it was
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask: not packed
    assert not can_pack(model)
    windowed = tiny_llama(vocab_size=len(tokenizer))
    windowed.config.sliding_window = 4  # a window would have to be in the mask
    assert not can_pack(windowed)
