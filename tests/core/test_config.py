"""SigmaConfig: validation on creation, index selection, and its JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from sigmatune import EigenTuneConfig, SigmaConfig
from sigmatune.core.config import BASIS_EFFORT


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rank=0), "rank must be a positive int or 'full'"),
        (dict(rank="all"), "rank must be a positive int or 'full'"),
        (dict(rank=True), "rank must be a positive int"),
        (dict(update="scale"), "update must be one of"),
        (dict(init="ones"), "init must be one of"),
        (dict(svd="fast"), "svd must be one of"),
        (dict(selection="top"), "selection must be one of"),
        (dict(selection=[]), "selection must be 'principal'"),
        (dict(selection=[0, 0]), "must not repeat"),
        (dict(selection=[-1]), "non-empty list of ints"),
        (dict(selection={"q_proj": [1.5]}), "non-empty list of ints"),
        (dict(target_modules=[]), "target_modules must be"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(dtype="float8"), "dtype must be one of"),
        (dict(svd="randomized", rank="full"), "use svd='exact'"),
        (dict(svd="randomized", selection="minor"), "use svd='exact'"),
        (dict(init_std=float("nan")), "init_std must be a finite number"),
        (dict(svd_niter=-1), "svd_niter must be an int from 0 to 64"),
        (dict(svd_niter=10**7), "svd_niter must be an int from 0 to 64"),
        (dict(svd_oversample=10**9), "svd_oversample must be an int from 0 to 4096"),
        (dict(cache="yes"), "cache must be True or False"),
        (dict(cache_dir=3), "cache_dir must be a folder path"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        SigmaConfig(**fields)


def test_indices_for_each_selection():
    assert SigmaConfig(rank=3).indices_for("a.q_proj", 10) == [0, 1, 2]
    assert SigmaConfig(rank=3, selection="minor").indices_for("a.q_proj", 10) == [7, 8, 9]
    assert SigmaConfig(rank="full").indices_for("a.q_proj", 4) == [0, 1, 2, 3]
    assert SigmaConfig(selection=[5, 1]).indices_for("a.q_proj", 10) == [1, 5]
    per_layer = SigmaConfig(selection={"q_proj": [1], "layers.0.q_proj": [2, 3]})
    assert per_layer.indices_for("model.layers.0.q_proj", 10) == [2, 3]  # the most specific key wins
    assert per_layer.indices_for("model.layers.1.q_proj", 10) == [1]


def test_indices_out_of_range_name_the_layer():
    with pytest.raises(ValueError, match=r"rank=8 is larger than layer 'a.q_proj' allows.*4 singular values"):
        SigmaConfig(rank=8).indices_for("a.q_proj", 4)
    with pytest.raises(ValueError, match=r"'a.q_proj' has indices \[6\].*only 4"):
        SigmaConfig(selection=[1, 6]).indices_for("a.q_proj", 4)
    with pytest.raises(ValueError, match=r"selection gives no indices for layer 'a.v_proj'"):
        SigmaConfig(selection={"q_proj": [0]}).indices_for("a.v_proj", 4)


def test_randomized_svd_only_where_asked_and_cheap():
    assert SigmaConfig(rank=8, svd="randomized").svd_method_for(list(range(8)), 1024) == "randomized"
    assert SigmaConfig(rank=8, svd="randomized").svd_method_for(list(range(8)), 64) == "exact"
    assert SigmaConfig(rank=8).svd_method_for(list(range(8)), 1024) == "exact"  # auto
    assert SigmaConfig(svd="exact").svd_method_for([0], 4096) == "exact"


def test_the_math_and_the_effort_settings_are_apart():
    config = SigmaConfig(rank=8, band=1, structure="band", svd="randomized", cache_dir="/x", dtype="float64")
    assert set(config.adapter_settings()) == {f.name for f in dataclasses.fields(SigmaConfig)} - set(
        BASIS_EFFORT
    )
    mine = SigmaConfig(cache=False, svd_niter=9)
    joined = config.with_effort_of(mine)
    assert (joined.rank, joined.band, joined.cache, joined.svd_niter, joined.cache_dir) == (
        8,
        1,
        False,
        9,
        None,
    )
    assert config.with_effort_of(None).svd == "auto"


def test_json_round_trip_and_unknown_fields():
    config = SigmaConfig(rank="full", selection={"q_proj": [0, 3]}, update="additive", dtype="bfloat16")
    again = SigmaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match=r"unknown SigmaConfig fields \['banded'\].*upgrade sigmatune"):
        SigmaConfig.from_dict({**config.to_dict(), "banded": 2})


def test_cache_path_follows_settings(monkeypatch, tmp_path):
    assert SigmaConfig(cache_dir=str(tmp_path)).cache_path == tmp_path
    monkeypatch.setenv("SIGMATUNE_CACHE", str(tmp_path / "env"))
    assert SigmaConfig().cache_path == tmp_path / "env" / "bases"


def test_seed_config_maps_to_additive_principal_with_substring_targets():
    config = EigenTuneConfig(rank=4, target_modules=["q_proj", "v.proj"]).to_sigma_config()
    assert (config.rank, config.update, config.selection, config.svd) == (4, "additive", "principal", "exact")
    assert EigenTuneConfig().to_sigma_config().target_modules == "all-linear"
    assert re.fullmatch(config.target_modules, "model.layers.0.self_attn.q_proj_extra")
    assert not re.fullmatch(config.target_modules, "model.layers.0.self_attn.vXproj")
