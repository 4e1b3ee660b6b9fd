"""SigmaModel on tiny real transformers models: targets, adapters, save/load, merge, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from sigmatune import (
    AdapterFileError,
    BaseModelMismatchError,
    SigmaConfig,
    SigmaModel,
    SpectralLinear,
    get_sigma_model,
)
from sigmatune.formats.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from tests.models import TINY_LLAMA, logits, randomize, tiny_gpt2, tiny_llama, token_batch

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_zero_init_leaves_outputs_unchanged():
    base = tiny_llama()
    expected = logits(base)
    model = get_sigma_model(base, SigmaConfig(rank=4))
    assert torch.equal(logits(model), expected)


def test_all_linear_targets_every_linear_layer_but_the_head():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    names = set(model.spectral_layers())
    assert len(names) == 2 * len(ATTENTION_AND_MLP)
    assert {name.rsplit(".", 1)[-1] for name in names} == set(ATTENTION_AND_MLP)
    assert not isinstance(model.base_model.lm_head, SpectralLinear)


def test_targets_by_names_and_by_regex():
    by_name = get_sigma_model(tiny_llama(), SigmaConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    assert sorted(n.rsplit(".", 1)[-1] for n in by_name.spectral_layers()) == ["q_proj"] * 2 + ["v_proj"] * 2
    by_regex = get_sigma_model(tiny_llama(), SigmaConfig(rank=2, target_modules=r".*layers\.1\.mlp\..*"))
    assert sorted(by_regex.spectral_layers()) == [
        f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]


def test_trainable_parameters_are_the_vectors_only(capsys):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sigma_adapters.default.vector" in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 3 * 14
    model.print_trainable_parameters()
    assert "trainable params: 42 ||" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config, message",
    [
        (
            SigmaConfig(target_modules=["q_proj", "qproj"]),
            r"'qproj'.*matched no linear layer.*available: \[.*'q_proj'",
        ),
        (SigmaConfig(target_modules=["mlp"]), r"names \['model.layers.0.mlp', .*not linear"),
        (SigmaConfig(target_modules=r"nothing\..*"), "matched no linear layer"),
        (SigmaConfig(rank=40), r"rank=40 is larger than layer 'model.layers.0.self_attn.q_proj' allows.*32"),
    ],
)
def test_bad_targets_and_ranks_are_refused_and_leave_the_model_untouched(config, message):
    base = tiny_llama()
    with pytest.raises(ValueError, match=message):
        get_sigma_model(base, config)
    assert not any(isinstance(m, SpectralLinear) for m in base.modules())


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, update="additive"))
    randomize(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [WEIGHTS_NAME, CONFIG_NAME, "README.md"]
    )  # + the card
    loaded = SigmaModel.from_pretrained(tiny_llama(), tmp_path)
    for name, layer in model.spectral_layers().items():
        saved = layer.sigma_adapters["default"].vector
        assert torch.equal(loaded.spectral_layers()[name].sigma_adapters["default"].vector, saved)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default
    trainable = SigmaModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_bases_are_saved_only_when_asked(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    model.save_pretrained(tmp_path / "small")
    model.save_pretrained(tmp_path / "big", save_bases=True)
    small, big = (tmp_path / n / WEIGHTS_NAME for n in ("small", "big"))
    assert big.stat().st_size > small.stat().st_size + 14 * 2 * 32 * 4


def test_loading_onto_another_base_model_is_refused(tmp_path):
    model = get_sigma_model(tiny_llama(seed=0), SigmaConfig(rank=4))
    model.save_pretrained(tmp_path)
    other = tiny_llama(seed=7)  # same architecture, other weights
    with pytest.raises(BaseModelMismatchError, match=r"trained on another base model.*singular values"):
        SigmaModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, SpectralLinear) for m in other.modules())  # left as it was
    smaller = tiny_llama(seed=0, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(BaseModelMismatchError, match="layer shapes differ"):
        SigmaModel.from_pretrained(smaller, tmp_path)


def test_the_same_base_in_another_dtype_loads(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4))
    randomize(model, scale=0.05)
    model.save_pretrained(tmp_path)
    loaded = SigmaModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), tmp_path)
    torch.testing.assert_close(logits(loaded).float(), logits(model), rtol=0.1, atol=0.1)


def test_damaged_files_give_clear_errors(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    model.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        AdapterFileError, match=f"{WEIGHTS_NAME}: is not a readable safetensors file.*truncated"
    ):
        SigmaModel.from_pretrained(tiny_llama(), tmp_path)
    weights.write_bytes(b"\x00" * 8 + data[8:])
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        SigmaModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(AdapterFileError, match="does not exist"):
        SigmaModel.from_pretrained(tiny_llama(), tmp_path)


def test_nan_vector_is_not_saved_and_the_previous_adapter_survives(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    randomize(model)
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    layer = next(iter(model.spectral_layers().values()))
    with torch.no_grad():
        layer.sigma_adapters["default"].vector[0] = float("nan")
    with pytest.raises(ValueError, match=r"q_proj' holds NaN or Inf.*left as it was"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_several_adapters_add_switch_delete_and_save(tmp_path):
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=4))
    randomize(model, seed=1)
    model.add_adapter(
        "attn", SigmaConfig(rank="full", target_modules=["q_proj", "o_proj"], update="additive")
    )
    model.set_adapter("attn")
    randomize(model, seed=2)
    out_attn = logits(model)
    model.set_adapter("default")
    out_default = logits(model)
    assert not torch.allclose(out_attn, out_default)
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / "attn" / WEIGHTS_NAME).exists()
    reloaded = SigmaModel.from_pretrained(tiny_llama(), tmp_path / "attn", adapter_name="attn")
    torch.testing.assert_close(logits(reloaded), out_attn, rtol=0, atol=1e-6)
    model.delete_adapter("attn")
    assert torch.equal(logits(model), out_default)
    with pytest.raises(KeyError, match="no adapter 'attn'"):
        model.set_adapter("attn")
    model.delete_adapter("default")
    assert not model.spectral_layers()  # every layer got its original module back


def test_disable_adapter_gives_the_base_model():
    base = tiny_llama()
    expected = logits(base)
    model = get_sigma_model(base, SigmaConfig(rank=4))
    randomize(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert not torch.equal(logits(model), expected)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_and_unload_gives_the_plain_model_with_adapted_outputs(make):
    model = get_sigma_model(make(), SigmaConfig(rank=4, update="additive"))
    randomize(model, scale=0.1)
    adapted = logits(model)
    plain = model.merge_and_unload()
    assert type(plain) is type(make())
    assert not any(isinstance(m, SpectralLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-5)


def test_merge_is_idempotent_and_unmerge_restores_the_weights():
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_sigma_model(base, SigmaConfig(rank=4))
    randomize(model)
    adapted = logits(model)
    model.merge()
    once = {k: v.clone() for k, v in base.state_dict().items()}
    model.merge()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in once.items())
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        model.add_adapter("other", SigmaConfig(rank=2))
    model.unmerge()
    restored = model.unload()
    assert isinstance(restored, LlamaForCausalLM) and not any(
        isinstance(m, SpectralLinear) for m in restored.modules()
    )
    assert restored.state_dict().keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_state_dict_holds_only_the_adapters_and_loads_back():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=3))
    randomize(model)
    state = model.state_dict()
    assert len(state) == 14 and all(k.endswith(".sigma_adapters.default.vector") for k in state)
    fresh = get_sigma_model(tiny_llama(), SigmaConfig(rank=3))
    fresh.load_state_dict(state)
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(RuntimeError, match="adapter keys missing"):
        fresh.load_state_dict(dict(list(state.items())[:3]))


def test_bases_come_from_the_full_precision_state_dict():
    exact = tiny_llama()
    full_precision = {k: v.clone() for k, v in exact.state_dict().items()}
    coarse = tiny_llama()
    with torch.no_grad():  # stand-in for a quantized base: weights rounded to 3 bits of mantissa
        for p in coarse.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())
    from_state = get_sigma_model(
        coarse, SigmaConfig(rank=4, svd="exact"), full_precision_state_dict=full_precision
    )
    reference = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    for name, layer in reference.spectral_layers().items():
        torch.testing.assert_close(from_state.spectral_layers()[name].sigma_basis, layer.sigma_basis)
    with pytest.raises(ValueError, match=r"has shape .* the state dict belongs to another model"):
        bad = {k: v[:, :4] if k.endswith("q_proj.weight") else v for k, v in full_precision.items()}
        get_sigma_model(tiny_llama(), SigmaConfig(rank=2), full_precision_state_dict=bad)


def test_attributes_and_generate_reach_the_base_model():
    model = get_sigma_model(tiny_llama(), SigmaConfig(rank=2))
    assert model.config.hidden_size == TINY_LLAMA["hidden_size"]
    out = model.generate(token_batch(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_matches_cpu_and_trains(dtype, tmp_path):
    cpu = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    gpu = get_sigma_model(tiny_llama(dtype=dtype).cuda(), SigmaConfig(rank=4, svd="exact"))
    layer = next(iter(gpu.spectral_layers().values()))
    assert layer.sigma_basis.is_cuda and layer.sigma_basis.dtype == dtype
    assert layer.sigma_adapters["default"].vector.dtype == torch.float32  # trained in fp32
    randomize(cpu, scale=0.1)
    randomize(gpu, scale=0.1)
    ids = token_batch()
    torch.testing.assert_close(logits(gpu, ids.cuda()).float().cpu(), logits(cpu, ids), rtol=0.05, atol=0.05)
    gpu(ids.cuda(), labels=ids.cuda()).loss.backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in gpu.parameters() if p.requires_grad)
    gpu.save_pretrained(tmp_path)
    assert torch.equal(
        logits(SigmaModel.from_pretrained(tiny_llama(dtype=dtype).cuda(), tmp_path), ids.cuda()),
        logits(gpu, ids.cuda()),
    )
