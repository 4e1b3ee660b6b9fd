"""Forged adapter files that pass their checksum (it is recomputed: a checksum finds damage, not an
attacker) and try to steer the loader: where it writes, how hard it works, which format's rules apply.
Each must be refused by name, or load as the original adapter with no side effect, within a time and
memory limit. Only the settings that define an adapter's math are read from a file; how bases are
computed and kept (svd, svd_niter, svd_oversample, dtype, cache_dir, cache) is the caller's."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest
import torch

from sigmatune import SigmaConfig, SigmaModel, get_sigma_model
from sigmatune.formats.adapter_file import WEIGHTS_NAME
from tests.formats.test_fuzz_files import (
    MEMORY_GROWTH_LIMIT,
    load_case,
    loaded_vectors,
    read_parts,
    write_raw,
)
from tests.models import randomize, tiny_llama

SECONDS = 10  # a load that takes longer was steered into working too hard


def steering_edits(attacker: Path) -> dict:
    """Header edits that a harmless loader ignores (the adapter loads as it was saved)."""
    return {
        "cache_dir of the attacker's choice": {"cache_dir": str(attacker / "made-by-the-file")},
        "cache_dir in the user's home": {"cache_dir": "~/.sigmatune-attack"},
        "cache off": {"cache": False},
        "randomized SVD": {"svd": "randomized"},
        "svd_niter 10**7": {"svd": "randomized", "svd_niter": 10**7},
        "svd_oversample 10**9": {"svd": "randomized", "svd_oversample": 10**9},
        "svd_niter 10**7 on auto": {"svd_niter": 10**7, "svd_oversample": 10**9},
        "bases in float64": {"dtype": "float64"},
        "bases in bfloat16": {"dtype": "bfloat16"},
        "bases in float16": {"dtype": "float16"},
        "all of them": {
            "cache_dir": str(attacker / "all"),
            "svd": "randomized",
            "svd_niter": 10**7,
            "svd_oversample": 10**9,
            "dtype": "float16",
        },
    }


def test_settings_that_steer_effort_or_paths_are_ignored(originals, target, tmp_path, monkeypatch):
    attacker = tmp_path / "attacker"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tensors, header = read_parts(originals / "plain")
    target.load_adapter(originals / "plain", adapter_name="reference")
    reference = loaded_vectors(target, "reference")
    dtypes = {name: layer.sigma_basis.dtype for name, layer in target.spectral_layers().items()}
    target.delete_adapter("reference")
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i, (label, edit) in enumerate(steering_edits(attacker).items()):
        forged = json.loads(json.dumps(header))
        forged["config"].update(edit)
        write_raw(tmp_path / f"case{i}", tensors, forged)
        started = time.perf_counter()
        assert load_case(target, tmp_path / f"case{i}", f"case{i}") is None, label
        assert time.perf_counter() - started < SECONDS, f"{label}: the load took too long"
        got = loaded_vectors(target, f"case{i}")
        assert all(torch.equal(got[k], reference[k]) for k in reference), label
        assert {n: m.sigma_basis.dtype for n, m in target.spectral_layers().items()} == dtypes, label
        target.delete_adapter(f"case{i}")
    assert not attacker.exists(), "a file made the loader create a folder"
    assert not (tmp_path / "home").exists(), "a file made the loader write in the user's home"
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    assert growth < MEMORY_GROWTH_LIMIT, f"peak memory grew by {growth / 2**20:.0f} MiB"


def test_the_effort_settings_are_not_written_into_a_file(tmp_path):
    config = SigmaConfig(rank=4, cache_dir=str(tmp_path / "my-cache"), svd="exact", dtype="float64")
    model = get_sigma_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "out")
    _, header = read_parts(tmp_path / "out")
    assert not {"cache_dir", "cache", "svd", "svd_niter", "svd_oversample", "dtype"} & set(header["config"])
    assert str(tmp_path) not in (tmp_path / "out" / WEIGHTS_NAME).read_bytes().decode("latin-1")


def test_the_callers_effort_settings_apply_when_loading(originals, tmp_path):
    own_cache = tmp_path / "callers-cache"
    model = SigmaModel.from_pretrained(
        tiny_llama(), originals / "plain", basis_config=SigmaConfig(cache_dir=str(own_cache), dtype="float64")
    )
    assert any(own_cache.glob("*.safetensors")), "the caller's cache_dir was not used"
    assert {layer.sigma_basis.dtype for layer in model.spectral_layers().values()} == {torch.float64}


@pytest.fixture(scope="module")
def band_original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("band") / "band"
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, structure="band", band=1))
    randomize(model, scale=0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "version, checksum",
    [(1, False), (1, True), (2, True), (2, False)],
    ids=["v1 without checksum", "v1 with checksum", "v2", "v2 without checksum"],
)
def test_a_band_in_a_file_of_a_version_before_bands_is_refused(
    version,
    checksum,
    band_original,
    target,
    tmp_path,
):
    tensors, header = read_parts(band_original)
    header["format_version"] = version
    write_raw(tmp_path / "old", tensors, header, checksum=checksum)
    err = load_case(target, tmp_path / "old", "old")
    assert err is not None and "format version" in str(err)


def test_a_diagonal_version_1_file_without_checksum_still_loads(originals, target, tmp_path):
    tensors, header = read_parts(originals / "plain")
    header["format_version"] = 1
    write_raw(tmp_path / "v1", tensors, header, checksum=False)
    assert load_case(target, tmp_path / "v1", "v1") is None
    target.delete_adapter("v1")


def test_a_header_too_large_to_be_an_adapters_is_refused_before_it_is_parsed(
    originals,
    target,
    tmp_path,
):
    tensors, header = read_parts(originals / "plain")
    header["padding"] = "x" * (20 * 2**20)
    write_raw(tmp_path / "big", tensors, header)
    started = time.perf_counter()
    err = load_case(target, tmp_path / "big", "big")
    assert err is not None and "header" in str(err)
    assert time.perf_counter() - started < 2
