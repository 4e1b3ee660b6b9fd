"""The diagonal plus a rank-1 term (core/structures/diag_rank1.py: M = diag(g) + u vᵀ over S), added as one
file, its registry line and its lr: it starts as the identity with a gradient for v, and works where a
structure goes — files, merge and LoRA export, a bank beside other structures, compression, training
together, the HF Trainer and torch.compile. (Its fp64 layer reference: tests/core/test_backends.py.)"""

from __future__ import annotations

import torch
from peft import PeftModel

from sigmatune import AdapterBank, SigmaConfig, SigmaModel, Together, get_sigma_model, read_adapter
from tests.models import assert_compiled_matches_eager, logits, randomize, tiny_llama, token_batch
from tests.training.test_trainer import train

RANK1 = SigmaConfig(rank=6, structure="diag_rank1", svd="exact")


def rank1_model(config=RANK1, seed=0, scale=0.2) -> SigmaModel:
    model = get_sigma_model(tiny_llama(), config)
    randomize(model, seed=seed, scale=scale)
    return model


def test_it_starts_as_the_identity_and_v_learns_first():
    model = get_sigma_model(tiny_llama(), RANK1)
    torch.testing.assert_close(logits(model), logits(tiny_llama()))
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    layer = next(iter(model.spectral_layers().values())).sigma_adapters["default"]
    g, u, v = layer.vector.detach()
    assert (
        float(g.abs().max()) == 0
        and float(v.abs().max()) == 0
        and torch.allclose(u, torch.full((6,), 6**-0.5))
    )
    dg, du, dv = layer.vector.grad
    assert float(dg.abs().max()) > 0 and float(dv.abs().max()) > 0 and float(du.abs().max()) == 0


def test_files_merge_lora_export_and_compression(tmp_path):
    model = rank1_model()
    ours = logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert all(layer.vector.shape == (3, 6) for layer in read_adapter(tmp_path / "saved").layers.values())
    torch.testing.assert_close(logits(SigmaModel.from_pretrained(tiny_llama(), tmp_path / "saved")), ours)
    model.export_lora(tmp_path / "lora")
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")), ours, rtol=1e-5, atol=1e-5
    )
    model.merge()
    torch.testing.assert_close(logits(model), ours, rtol=1e-5, atol=1e-5)
    model.unmerge()
    full = model.compress(6, new_name="all")  # every direction kept: the same adapter
    model.set_adapter("all")
    assert full.total == torch.tensor(1.0).item()
    torch.testing.assert_close(logits(model), ours, rtol=1e-5, atol=1e-5)


def test_a_bank_serves_it_beside_a_diagonal_adapter(tmp_path):
    rank1_model().save_pretrained(tmp_path / "rank1")
    rank1_model(SigmaConfig(rank=8, svd="exact"), seed=1).save_pretrained(tmp_path / "diag")
    bank = AdapterBank.over(tiny_llama(), SigmaConfig(rank=8, svd="exact"))
    for name in ("rank1", "diag"):
        bank.load(name, tmp_path / name)
    ids = token_batch(batch=2, length=8)
    with torch.no_grad():
        mixed = bank(ids, adapter_ids=["rank1", "diag"]).logits
    for row, name in enumerate(("rank1", "diag")):
        alone = SigmaModel.from_pretrained(tiny_llama(), tmp_path / name)
        torch.testing.assert_close(
            mixed[row : row + 1], logits(alone, ids[row : row + 1]), rtol=1e-5, atol=1e-5
        )


def test_adapters_train_together_as_each_alone():
    model = get_sigma_model(tiny_llama(dtype=torch.float64), RANK1, "a")
    model.add_adapter("b", RANK1)
    for seed, name in enumerate("ab"):
        model.set_adapter(name)
        randomize(model, seed=seed, scale=0.2)
    tokens, ids = token_batch(batch=2), torch.tensor([1, 0])
    with Together(model, ["a", "b"]) as together:
        together.rows(ids)
        mixed = model(input_ids=tokens).logits.detach()
    for k, name in enumerate("ab"):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[ids == k], logits(model, tokens[ids == k]), rtol=1e-10, atol=1e-10)


def test_the_trainer_trains_it_and_it_compiles(tmp_path):
    model = get_sigma_model(tiny_llama(), RANK1)
    _, losses = train(model, tmp_path)
    assert losses[-1] < losses[0], losses
    assert_compiled_matches_eager(rank1_model(scale=0.1))
