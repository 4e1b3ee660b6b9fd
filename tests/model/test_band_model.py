"""Band adapters on whole models, as diagonal ones are tested: files, merge, LoRA export in PEFT, the
bank, the Trainer, torch.compile, a quantized base; and compression of both structures."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch
from peft import PeftModel

from sigmatune import AdapterBank, AdapterFileError, SigmaConfig, SigmaModel, get_sigma_model, read_adapter
from sigmatune.cli import main
from sigmatune.formats.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from tests.model.test_quantized import quantized_llama, same_vectors
from tests.models import (
    assert_compiled_matches_eager,
    logits,
    randomize,
    save_tiny_chat_model,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from tests.training.test_trainer import train

BAND = SigmaConfig(rank=8, structure="band", band=2, svd="exact")


def band_model(make=tiny_llama, config=BAND, seed=0, scale=0.2) -> SigmaModel:
    model = get_sigma_model(make(), config)
    randomize(model, seed=seed, scale=scale)
    return model


def test_save_and_load_round_trip_in_format_3(tmp_path):
    model = band_model()
    model.save_pretrained(tmp_path)
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert header["format_version"] == 3 and header["config"]["structure"] == "band"
    record = read_adapter(tmp_path)
    assert all(layer.vector.shape == (5, 8) for layer in record.layers.values())  # 2b+1 diagonals, r
    loaded = SigmaModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_a_band_file_whose_vector_has_the_wrong_shape_is_refused(tmp_path):
    band_model().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safetensors.safe_open(str(path), framework="pt") as reader:
        metadata, tensors = reader.metadata(), {k: reader.get_tensor(k) for k in reader.keys()}  # noqa: SIM118
    name = next(k for k in tensors if k.endswith(".vector"))
    tensors[name] = tensors[name][2]  # one diagonal only: (r,), as a diagonal adapter's
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterFileError, match=r"vector as \[8\]; a band adapter's is \[5, 'r'\]"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_and_lora_export_equal_the_band_adapter(make, tmp_path):
    model = band_model(make, SigmaConfig(rank=6, structure="band", band=1, svd="exact"))
    ours = logits(model)
    rank = model.export_lora(tmp_path)
    assert rank == 6
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model.merge_and_unload()), ours, rtol=1e-5, atol=1e-5)


def test_a_bank_serves_band_and_diagonal_adapters_in_one_batch(tmp_path):
    folders = {}
    configs = {
        "band": BAND,
        "diag": SigmaConfig(rank=6, svd="exact"),
        "band1": SigmaConfig(rank=4, structure="band", band=1, svd="exact"),
    }
    for seed, (name, config) in enumerate(configs.items()):
        folders[name] = tmp_path / name
        band_model(config=config, seed=seed).save_pretrained(folders[name])
    bank = AdapterBank.over(tiny_llama(), SigmaConfig(rank=8, svd="exact"))
    for name, folder in folders.items():
        bank.load(name, folder)
    bank.add_mix("blend", {"band": 0.5, "diag": 0.5})
    names = ["band", "base", "diag", "band1", "blend"]
    ids = token_batch(batch=len(names), length=8)
    with torch.no_grad():
        mixed = bank(ids, adapter_ids=names).logits
    for row, name in enumerate(names[:4]):
        alone = SigmaModel.from_pretrained(tiny_llama(), folders[name]) if name != "base" else tiny_llama()
        torch.testing.assert_close(
            mixed[row : row + 1], logits(alone, ids[row : row + 1]), rtol=1e-5, atol=1e-5
        )
    blend = get_sigma_model(tiny_llama(), BAND)  # M = ½ M_band + ½ diag(g_diag), on the bank's top-8
    band, diag = (SigmaModel.from_pretrained(tiny_llama(), folders[n]) for n in ("band", "diag"))
    with torch.no_grad():
        for name, layer in blend.spectral_layers().items():
            vector = layer.sigma_adapters["default"].vector
            vector.copy_(0.5 * band.spectral_layers()[name].sigma_adapters["default"].vector)
            vector[2, :6] += 0.5 * diag.spectral_layers()[name].sigma_adapters["default"].vector
    torch.testing.assert_close(mixed[4:5], logits(blend, ids[4:5]), rtol=1e-5, atol=1e-5)


def test_the_trainer_trains_a_band(tmp_path):
    model = get_sigma_model(tiny_llama(), BAND)
    _, losses = train(model, tmp_path)
    assert losses[-1] < losses[0], losses
    assert {p.shape for p in model.parameters() if p.requires_grad} == {(5, 8)}


def test_compiles_with_fullgraph_and_matches_eager():
    model = band_model(scale=0.1)
    assert_compiled_matches_eager(model)


def test_a_band_on_a_quantized_base_follows_the_dense_one():
    dense = band_model(scale=0.1)
    quantized = get_sigma_model(quantized_llama("int8"), BAND)
    same_vectors(dense, quantized)
    difference = float((logits(quantized) - logits(dense)).abs().max())
    quantization_error = float((logits(quantized_llama("int8")) - logits(tiny_llama())).abs().max())
    assert difference <= 3 * quantization_error, (difference, quantization_error)


# ---- compression ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SigmaConfig(rank="full"), BAND, SigmaConfig(rank=12, update="additive")])
def test_compressing_to_every_direction_changes_nothing(config):
    model = band_model(config=config)
    before = logits(model)
    report = model.compress(64)
    model.set_adapter("default-r64")
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
    assert report.total == pytest.approx(1.0) and all(
        share == pytest.approx(1.0) for share in report.layers.values()
    )


@pytest.mark.parametrize(
    "config", [SigmaConfig(rank="full", svd="exact"), SigmaConfig(rank="full", structure="band", band=1)]
)
def test_compression_keeps_the_largest_directions_and_serves_at_that_rank(config, tmp_path):
    model = band_model(config=config, scale=0.05)
    with torch.no_grad():  # one large direction per layer: compression must find and keep it
        for layer in model.spectral_layers().values():
            vector = layer.sigma_adapters["default"].vector
            (vector if vector.dim() == 1 else vector[1])[5] = 1.0
    report = model.compress(2)
    assert 0 < report.total < 1 and report.rank == 2
    for layer in model.spectral_layers().values():
        assert 5 in layer.sigma_adapters["default-r2"].indices.tolist()
        assert len(layer.sigma_adapters["default-r2"].indices) == 2
    model.set_adapter("default-r2")
    compressed = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["default-r2"])
    loaded = SigmaModel.from_pretrained(tiny_llama(), tmp_path / "default-r2")
    torch.testing.assert_close(logits(loaded), compressed, rtol=1e-6, atol=1e-6)
    assert loaded.export_lora(tmp_path / "lora") == 2  # a rank-2 LoRA
    bank = AdapterBank.over(
        tiny_llama(),
        SigmaConfig(
            rank=2,
            selection={
                name: layer.sigma_adapters["default-r2"].indices.tolist()
                for name, layer in model.spectral_layers().items()
            },
        ),
    )
    bank.load("small", tmp_path / "default-r2")
    ids = token_batch(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(
            bank(ids, adapter_ids=["small"]).logits, logits(loaded, ids), rtol=1e-5, atol=1e-5
        )


def test_the_compress_command_writes_a_small_adapter(tmp_path, capsys):
    folder = save_tiny_chat_model(tmp_path / "model", ["a b c d e f g", "one two three"])
    from sigmatune.hub.loading import load_model

    model = get_sigma_model(load_model(str(folder))[0], SigmaConfig(rank="full"))
    randomize(model, scale=0.1)
    model.save_pretrained(tmp_path / "full")
    code = main(
        ["compress", str(tmp_path / "full"), str(tmp_path / "small"), "--rank", "4", "--model", str(folder)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "of the update's ‖ΔW‖_F at rank 4" in out and "written to" in out
    record = read_adapter(tmp_path / "small")
    assert all(len(layer.indices) == 4 for layer in record.layers.values())
    assert (
        main(
            ["compress", str(tmp_path / "full"), str(tmp_path / "bad"), "--rank", "0", "--model", str(folder)]
        )
        == 1
    )


def test_inspect_shows_the_band(tmp_path, capsys):
    from sigmatune.commands import inspect_adapter

    band_model().save_pretrained(tmp_path / "band")
    summary = inspect_adapter(tmp_path / "band", plot=str(tmp_path / "band.png"))
    assert "structure=band b=2" in capsys.readouterr().out
    assert all(0 < row["off_diagonal_share"] < 1 and row["trained"] == 5 * 8 for row in summary["layers"])
    assert (tmp_path / "band.png").stat().st_size > 10_000


def test_a_band_adapter_is_refused_by_a_bank_that_stores_fewer_directions(tmp_path):
    band_model().save_pretrained(tmp_path)
    small = AdapterBank.over(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    with pytest.raises(ValueError, match=r"selects singular directions \[4, 5, 6, 7\].*larger rank"):
        small.load("band", tmp_path)
