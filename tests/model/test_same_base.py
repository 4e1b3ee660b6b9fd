"""One rule for "the same base": every basis sigmatune computes is the exact SVD's (within
svd.BASIS_TOLERANCE), however it was computed (exact, randomized, read from the cache), so an adapter
saved from one model loads onto any other wrapping of the same weights: a compressed adapter, a top-16
adapter in a top-64 bank, a cache file that was tampered with.

The models are wide enough (hidden 256) that svd="auto" would pick the randomized SVD for a top-16
adapter, whose spectra on random weights are flat: the case that broke (issue 38, items 2 and 3).
"""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch

from sigmatune import AdapterBank, SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.cli import main
from sigmatune.core.svd import BASIS_TOLERANCE, SpectrumRequest, compute_spectra, spectrum_error
from sigmatune.core.weights import fingerprint
from sigmatune.formats.basis_cache import BasisCache
from sigmatune.hub.loading import load_model
from tests.models import logits, randomize, save_tiny_chat_model, tiny_llama, token_batch

WIDE = dict(hidden_size=256, intermediate_size=320)


def wide_llama(seed: int = 0):
    return tiny_llama(seed, **WIDE)


def bank_logits(bank: AdapterBank, name: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bank(ids, adapter_ids=[name] * ids.shape[0]).logits


def test_every_computed_basis_is_the_exact_one_within_the_tolerance():
    weight = torch.randn(320, 256, generator=torch.Generator().manual_seed(0))  # a flat spectrum
    exact = compute_spectra([SpectrumRequest("w", weight, list(range(16)), "exact", "f")], progress=False)[
        "w"
    ]
    for method in ("exact", "randomized"):
        request = SpectrumRequest("w", weight, list(range(16)), method, "f")
        spectrum = compute_spectra([request], oversample=16, niter=4, progress=False)["w"]
        assert spectrum_error(weight, spectrum) <= BASIS_TOLERANCE
        assert float((spectrum.sigma - exact.sigma).abs().max() / exact.sigma_max) <= BASIS_TOLERANCE


def test_the_readme_example_adapter_loads_into_a_rank_64_bank(tmp_path):
    model = get_sigma_model(wide_llama(), SigmaConfig(rank=16))  # the README's Example
    randomize(model, scale=0.3)
    model.save_pretrained(tmp_path / "my-adapter")
    expected = logits(SigmaModel.from_pretrained(wide_llama(), tmp_path / "my-adapter"))
    bank = AdapterBank.over(wide_llama(), SigmaConfig(rank=64))
    bank.load("mine", tmp_path / "my-adapter")  # BaseModelMismatchError before: randomized σ vs exact
    torch.testing.assert_close(bank_logits(bank, "mine", token_batch()), expected, rtol=1e-4, atol=1e-4)


def test_a_compressed_adapter_loads_and_computes_what_it_computed_when_made(tmp_path):
    model = get_sigma_model(wide_llama(), SigmaConfig(rank=16))
    randomize(model, scale=0.3)
    model.compress(8, new_name="small")
    model.set_adapter("small")
    made = logits(model)
    model.save_pretrained(tmp_path / "out", selected_adapters=["small"])
    loaded = SigmaModel.from_pretrained(wide_llama(), tmp_path / "out" / "small")
    torch.testing.assert_close(logits(loaded), made, rtol=1e-4, atol=1e-4)
    bank = AdapterBank.over(wide_llama(), SigmaConfig(rank=16))
    bank.load("small", tmp_path / "out" / "small")
    torch.testing.assert_close(bank_logits(bank, "small", token_batch()), made, rtol=1e-4, atol=1e-4)


def test_train_compress_generate_and_serve_from_the_command_line(tmp_path, capsys):
    texts = [f"Is {n} even? {'yes' if n % 2 == 0 else 'no'}" for n in range(60)]
    folder = save_tiny_chat_model(tmp_path / "model", [*texts, "system user assistant"], **WIDE)
    rows = [{"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(60)]
    (tmp_path / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    adapter, small = tmp_path / "adapter", tmp_path / "small"
    common = ["--model", str(folder), "--data", str(tmp_path / "parity.jsonl")]
    train = ["train", *common, "--rank", "16", "--steps", "3", "--heldout", "10", "--eval-accuracy", "2"]
    assert main([*train, "--output-dir", str(adapter)]) == 0
    assert main(["compress", str(adapter), str(small), "--rank", "8", "--calibrate", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(small), "Is 4 even?", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    base = SigmaModel.from_pretrained(load_model(str(folder))[0], small)
    bank = AdapterBank.over(load_model(str(folder))[0], SigmaConfig(rank=16))
    bank.load("small", small)
    torch.testing.assert_close(bank_logits(bank, "small", token_batch()), logits(base), rtol=1e-4, atol=1e-4)


def test_a_tampered_cache_file_is_recomputed_not_trusted(isolated_cache):
    config = SigmaConfig(rank=8)
    fresh = logits(randomized_model(config))
    cached = sorted(isolated_cache.glob("*.safetensors"))
    assert cached, "the first wrap wrote no cache file"
    for path in cached:  # rotate the first two directions of every layer: still orthonormal, still finite
        tensors = safetensors.torch.load_file(path)
        with open(path, "rb") as handle:
            metadata = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
        for name in [n for n in tensors if n.endswith(".basis")]:
            a, b = tensors[name][:, 0].clone(), tensors[name][:, 1].clone()
            tensors[name][:, 0], tensors[name][:, 1] = (a + b) / 2**0.5, (a - b) / 2**0.5
        safetensors.torch.save_file(tensors, path, metadata)
    with pytest.warns(UserWarning, match="basis cache"):
        again = logits(randomized_model(config))
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)


def randomized_model(config: SigmaConfig) -> SigmaModel:
    model = get_sigma_model(wide_llama(), config)
    randomize(model, scale=0.3)
    return model


def test_the_cache_check_accepts_what_it_wrote(isolated_cache):
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    request = SpectrumRequest("w", weight, list(range(6)), "exact", fingerprint(weight))
    cache = BasisCache(isolated_cache)
    first = compute_spectra([request], cache=cache, progress=False)["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = compute_spectra([request], cache=cache, progress=False)["w"]
    assert torch.equal(first.basis, second.basis)
