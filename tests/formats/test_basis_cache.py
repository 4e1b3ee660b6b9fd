"""The basis cache: the second initialisation reads the bases computed by the first, all layers from one
file; a damaged file is recomputed with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from sigmatune.core.svd import compute_spectra
from sigmatune.formats.basis_cache import BasisCache
from tests.core.test_svd import decaying, request


def test_second_init_comes_from_the_cache(tmp_path, caplog):
    weights = [decaying(seed=s) for s in range(4)]
    requests = [request(w, [0, 1, 2, 3], name=str(i)) for i, w in enumerate(weights)]
    with caplog.at_level(logging.INFO, logger="sigmatune.core.svd"):
        first = compute_spectra(requests, cache=BasisCache(tmp_path), progress=False)
        second = compute_spectra(requests, cache=BasisCache(tmp_path), progress=False)
    assert "bases: 0 from cache, 4 to compute" in caplog.text
    assert "bases: 4 from cache, 0 to compute" in caplog.text
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # one file for the four layers
    for name in first:
        assert torch.equal(first[name].basis, second[name].basis)
        assert torch.equal(first[name].indices, second[name].indices)
    other = compute_spectra([request(weights[0], [0, 2])], cache=BasisCache(tmp_path), progress=False)["w"]
    assert other.basis.shape == (64, 2)  # another selection is another cache entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written by rename, nothing left behind


def test_damaged_cache_file_is_recomputed_with_a_warning(tmp_path):
    weight = decaying()
    good = compute_spectra([request(weight, [0, 1])], cache=BasisCache(tmp_path), progress=False)["w"]
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="damaged basis cache"):
        again = compute_spectra([request(weight, [0, 1])], cache=BasisCache(tmp_path), progress=False)["w"]
    assert torch.equal(good.basis, again.basis)
    assert compute_spectra([request(weight, [0, 1])], cache=BasisCache(tmp_path), progress=False)[
        "w"
    ].basis.equal(good.basis)
