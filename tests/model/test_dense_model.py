"""The dense structure (core/structures/dense.py: LoRA-XS's r × r core M over the top r directions), added as
one file and its registry line, works everywhere a structure goes, through the protocol alone: the exact
two-sided weight W (I + V M Vᵀ) in fp64, files, merge and unmerge, LoRA export read by PEFT, a bank with
mixes beside diagonal and band adapters, compression, the HF Trainer and torch.compile."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from sigmatune import AdapterBank, SigmaConfig, SigmaModel, get_sigma_model, read_adapter
from sigmatune.core.structures.dense import Dense
from tests.core.test_layer import SHAPES, make_linear, wrap
from tests.models import assert_compiled_matches_eager, logits, randomize, tiny_gpt2, tiny_llama, token_batch
from tests.reference import reference_band_weight
from tests.training.test_trainer import train

DENSE = SigmaConfig(rank=6, structure="dense", svd="exact")


def dense_model(make=tiny_llama, config=DENSE, seed=0, scale=0.2) -> SigmaModel:
    model = get_sigma_model(make(), config)
    randomize(model, seed=seed, scale=scale)
    return model


@pytest.mark.parametrize("side", SHAPES)
def test_a_dense_layer_is_the_two_sided_reference_in_fp64_values_and_gradients(side):
    linear = make_linear(SHAPES[side], dtype=torch.float64)
    layer = wrap(linear, SigmaConfig(rank=4, svd="exact"))
    layer.delete_adapter("default")
    layer.add_adapter("default", list(layer.stored_indices), "multiplicative", structure=Dense())
    layer.set_adapter("default")
    with torch.no_grad():
        layer.sigma_adapters["default"].vector.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = layer.sigma_adapters["default"].vector.detach().clone().requires_grad_(True)  # (4, 4)
    weight = reference_band_weight(linear.weight.detach(), list(layer.stored_indices), m, side)
    (x @ weight.T + linear.bias).square().sum().backward()
    out = layer(x)
    torch.testing.assert_close(out, x @ weight.detach().T + linear.bias.detach(), rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    torch.testing.assert_close(layer.sigma_adapters["default"].vector.grad, m.grad, rtol=1e-9, atol=1e-10)


def test_files_round_trip_and_the_vector_is_r_by_r(tmp_path):
    model = dense_model()
    model.save_pretrained(tmp_path)
    assert all(layer.vector.shape == (6, 6) for layer in read_adapter(tmp_path).layers.values())
    torch.testing.assert_close(logits(SigmaModel.from_pretrained(tiny_llama(), tmp_path)), logits(model))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_lora_export_equal_the_adapter(make, tmp_path):
    model = dense_model(make)
    ours = logits(model)
    assert model.export_lora(tmp_path) == 6
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(make(), tmp_path)), ours, rtol=1e-5, atol=1e-5
    )
    model.merge()
    torch.testing.assert_close(logits(model), ours, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(logits(model), ours, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model.merge_and_unload()), ours, rtol=1e-5, atol=1e-5)


def test_a_bank_serves_dense_beside_diagonal_and_band_adapters_and_their_mix(tmp_path):
    configs = {
        "dense": DENSE,
        "diag": SigmaConfig(rank=8, svd="exact"),
        "band": SigmaConfig(rank=8, structure="band", band=1, svd="exact"),
    }
    for seed, (name, config) in enumerate(configs.items()):
        dense_model(config=config, seed=seed).save_pretrained(tmp_path / name)
    bank = AdapterBank.over(tiny_llama(), SigmaConfig(rank=8, svd="exact"))
    for name in configs:
        bank.load(name, tmp_path / name)
    bank.add_mix("blend", {"dense": 0.5, "diag": 0.5})
    names = ["dense", "base", "diag", "band", "blend"]
    ids = token_batch(batch=len(names), length=8)
    with torch.no_grad():
        mixed = bank(ids, adapter_ids=names).logits
    for row, name in enumerate(names[:4]):
        alone = SigmaModel.from_pretrained(tiny_llama(), tmp_path / name) if name != "base" else tiny_llama()
        torch.testing.assert_close(
            mixed[row : row + 1], logits(alone, ids[row : row + 1]), rtol=1e-5, atol=1e-5
        )
    blend = get_sigma_model(tiny_llama(), SigmaConfig(rank=8, structure="dense", svd="exact"))
    dense, diag = (SigmaModel.from_pretrained(tiny_llama(), tmp_path / n) for n in ("dense", "diag"))
    with torch.no_grad():  # M = ½ M_dense (top 6 of 8) + ½ diag(g_diag)
        for name, layer in blend.spectral_layers().items():
            vector = layer.sigma_adapters["default"].vector
            vector[:6, :6] = 0.5 * dense.spectral_layers()[name].sigma_adapters["default"].vector
            vector += 0.5 * torch.diag(diag.spectral_layers()[name].sigma_adapters["default"].vector)
    torch.testing.assert_close(mixed[4:5], logits(blend, ids[4:5]), rtol=1e-5, atol=1e-5)


def test_compression_keeps_the_largest_directions(tmp_path):
    model = dense_model(scale=0.05)
    with torch.no_grad():  # one large direction per layer: compression must find and keep it
        for layer in model.spectral_layers().values():
            layer.sigma_adapters["default"].vector[3, 3] = 1.0
    before = logits(model)
    full = model.compress(6, new_name="all")
    model.set_adapter("all")
    assert full.total == pytest.approx(1.0)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)  # every direction kept: the same
    report = model.compress(2, "default", "small")
    assert 0 < report.total < 1
    for layer in model.spectral_layers().values():
        assert 3 in layer.sigma_adapters["small"].indices.tolist()
        assert layer.sigma_adapters["small"].vector.shape == (2, 2)
    model.set_adapter("small")
    model.save_pretrained(tmp_path, selected_adapters=["small"])
    loaded = SigmaModel.from_pretrained(tiny_llama(), tmp_path / "small")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-6, atol=1e-6)


def test_the_trainer_trains_it(tmp_path):
    model = get_sigma_model(tiny_llama(), DENSE)
    _, losses = train(model, tmp_path)
    assert losses[-1] < losses[0], losses
    assert {p.shape for p in model.parameters() if p.requires_grad} == {(6, 6)}


def test_compiles_with_fullgraph_and_matches_eager():
    model = dense_model(scale=0.1)
    assert_compiled_matches_eager(model)


def test_a_rank_too_wide_and_an_additive_rule_are_refused():
    with pytest.raises(ValueError, match="structure='dense' trains M in the multiplicative form"):
        SigmaConfig(rank=4, structure="dense", update="additive")
    with pytest.raises(ValueError, match="more than 256"):
        Dense().check(300, "wide")
