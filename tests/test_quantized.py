"""Quantized bases (torchao weight-only int8 and int4, on CPU): the base stays quantized, bases come
from the dequantized weights (or a full-precision state dict), training works, outputs follow the
dense-base adapter within quantization error, and merging gives a dense layer that unmerges back."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.weights import dequantized_weight, is_quantized
from tests.models import tiny_llama, token_batch
from tests.test_model import logits

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402

SCHEMES = {
    "int8": lambda: Int8WeightOnlyConfig(),
    "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4),
}


def quantized_llama(scheme: str):
    model = tiny_llama()
    quantize_(
        model,
        SCHEMES[scheme](),
        filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name,
    )
    return model


def same_vectors(source, target) -> None:
    with torch.no_grad():
        for name, layer in source.spectral_layers().items():
            target.spectral_layers()[name].sigma_adapters["default"].vector.copy_(
                layer.sigma_adapters["default"].vector
            )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_on_a_quantized_base_follows_the_dense_one(scheme):
    dense = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, svd="exact", init="normal", init_std=0.3))
    quantized = get_sigma_model(quantized_llama(scheme), SigmaConfig(rank=4, svd="exact"))
    same_vectors(dense, quantized)
    for layer in quantized.spectral_layers().values():
        assert is_quantized(layer.base_layer) and type(layer.base_layer.weight).__name__ != "Parameter"
        biggest = max(t.numel() for t in [*layer.buffers(), *layer.sigma_adapters.parameters()])
        assert biggest < layer.in_features * layer.out_features  # no dense copy of W is kept
    quantization_error = float(
        (logits(quantized_llama(scheme)) - logits(tiny_llama())).abs().max()
    )  # bases alone
    adapter_effect = float((logits(dense) - logits(tiny_llama())).abs().max())
    difference = float((logits(quantized) - logits(dense)).abs().max())
    # W_q (I + V G Vᵀ) against W (I + V G Vᵀ): the base's quantization error, scaled by at most 1 + max|g|
    largest = max(float(p.abs().max()) for p in dense.parameters() if p.requires_grad)
    assert difference <= 2 * (1 + largest) * quantization_error, (difference, quantization_error, largest)
    assert adapter_effect > quantization_error  # the adapter does more than quantizing the base does


def test_bases_from_a_full_precision_state_dict_equal_the_dense_bases():
    dense = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    full_precision = dict(tiny_llama().state_dict())
    quantized = get_sigma_model(
        quantized_llama("int8"), SigmaConfig(rank=4, svd="exact"), full_precision_state_dict=full_precision
    )
    for name, layer in dense.spectral_layers().items():
        torch.testing.assert_close(quantized.spectral_layers()[name].sigma_basis, layer.sigma_basis)


def test_training_on_a_quantized_base_lowers_the_loss():
    model = get_sigma_model(quantized_llama("int8"), SigmaConfig(rank="full", svd="exact"))
    ids = token_batch(batch=4, length=16, seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(is_quantized(layer.base_layer) for layer in model.spectral_layers().values())


def test_merge_into_a_quantized_base_is_dense_and_unmerges_to_the_original():
    model = get_sigma_model(
        quantized_llama("int8"), SigmaConfig(rank=4, svd="exact", init="normal", init_std=0.2)
    )
    adapted = logits(model)
    originals = {name: layer.base_layer for name, layer in model.spectral_layers().items()}
    with pytest.warns(UserWarning, match="merging into a quantized"):
        model.merge()
    for layer in model.spectral_layers().values():
        assert type(layer.base_layer) is torch.nn.Linear and not is_quantized(layer.base_layer)
    torch.testing.assert_close(logits(model), adapted, rtol=1e-4, atol=1e-4)
    model.unmerge()
    assert all(layer.base_layer is originals[name] for name, layer in model.spectral_layers().items())
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)


def test_merge_and_unload_can_requantize():
    model = get_sigma_model(
        quantized_llama("int8"), SigmaConfig(rank=4, svd="exact", init="normal", init_std=0.2)
    )
    adapted = logits(model)
    with pytest.warns(UserWarning, match="merging into a quantized"):
        plain = model.merge_and_unload(
            requantize=lambda layer: quantize_(layer, Int8WeightOnlyConfig()) or layer
        )
    layer = plain.model.layers[0].self_attn.q_proj
    assert is_quantized(layer) and dequantized_weight(layer).shape == (32, 32)
    torch.testing.assert_close(logits(plain), adapted, rtol=0, atol=0.05)


def test_a_layer_that_cannot_be_dequantized_gets_a_clear_error():
    model = tiny_llama()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features != 96:
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"cannot dequantize.*register_dequantizer"):
        get_sigma_model(model, SigmaConfig(rank=2))
