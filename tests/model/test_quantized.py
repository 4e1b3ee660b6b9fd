"""Quantized bases (torchao weight-only int8 and int4; bitsandbytes NF4 and int8 where installed — its
CPU backend runs here): the base stays quantized, bases come
from the dequantized weights (or a full-precision state dict), training works, outputs follow the
dense-base adapter within quantization error, and merging gives a dense layer that unmerges back."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.core.weights import dequantized_weight, is_quantized
from tests.models import logits, tiny_llama, token_batch

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:  # an optional peer: its schemes skip
    bnb = None


def torchao_scheme(config):
    def quantize(model):
        quantize_(
            model,
            config(),
            filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name,
        )

    return quantize


def bitsandbytes_scheme(bits: int):
    """Swap every decoder linear for a bitsandbytes layer holding the same weight (as load_in_4bit /
    load_in_8bit do); the CPU backend quantizes on .to('cpu')."""

    def quantize(model):
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if not isinstance(child, torch.nn.Linear) or child is model.lm_head:
                    continue
                shape = (child.in_features, child.out_features)
                if bits == 4:
                    layer = bnb.nn.Linear4bit(
                        *shape, bias=child.bias is not None, compute_dtype=torch.float32
                    )
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                else:
                    layer = bnb.nn.Linear8bitLt(*shape, bias=child.bias is not None, has_fp16_weights=False)
                    layer.weight = bnb.nn.Int8Params(
                        child.weight.data, requires_grad=False, has_fp16_weights=False
                    )
                if child.bias is not None:
                    layer.bias = child.bias
                setattr(parent, child_name, layer.to("cpu"))

    return quantize


needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
SCHEMES = {
    "int8": torchao_scheme(Int8WeightOnlyConfig),
    "int4": torchao_scheme(lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4)),
    "bnb-nf4": bitsandbytes_scheme(4),
    "bnb-int8": bitsandbytes_scheme(8),
}
ALL_SCHEMES = [pytest.param(name, marks=needs_bnb if name.startswith("bnb") else ()) for name in SCHEMES]


def quantized_llama(scheme: str):
    model = tiny_llama()
    SCHEMES[scheme](model)
    return model


def same_vectors(source, target) -> None:
    with torch.no_grad():
        for name, layer in source.spectral_layers().items():
            target.spectral_layers()[name].sigma_adapters["default"].vector.copy_(
                layer.sigma_adapters["default"].vector
            )


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
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
    if "8" in scheme:  # at 4 bits a 32-wide toy model's quantization error is larger than this adapter
        assert adapter_effect > quantization_error  # so that the bound above says something


def test_bases_from_a_full_precision_state_dict_equal_the_dense_bases():
    dense = get_sigma_model(tiny_llama(), SigmaConfig(rank=4, svd="exact"))
    full_precision = dict(tiny_llama().state_dict())
    quantized = get_sigma_model(
        quantized_llama("int8"), SigmaConfig(rank=4, svd="exact"), full_precision_state_dict=full_precision
    )
    for name, layer in dense.spectral_layers().items():
        torch.testing.assert_close(quantized.spectral_layers()[name].sigma_basis, layer.sigma_basis)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_training_on_a_quantized_base_lowers_the_loss(scheme):
    model = get_sigma_model(quantized_llama(scheme), SigmaConfig(rank="full", svd="exact"))
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


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_merge_into_a_quantized_base_is_dense_and_unmerges_to_the_original(scheme):
    model = get_sigma_model(
        quantized_llama(scheme), SigmaConfig(rank=4, svd="exact", init="normal", init_std=0.2)
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


class NoKernelWeight(torch.Tensor):
    """A quantized-looking weight whose layout has no dequantize kernel (like torchao's tinygemm int4)."""

    def dequantize(self):
        raise NotImplementedError("aten.dequantize is not implemented for this layout")


def test_a_layout_without_a_dequantize_kernel_gets_a_clear_error():
    model = tiny_llama()
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(NoKernelWeight), requires_grad=False)
    with pytest.raises(TypeError, match=r"cannot dequantize.*not implemented.*full_precision_state_dict"):
        get_sigma_model(model, SigmaConfig(rank=2))
    with pytest.warns(UserWarning, match="not in full_precision_state_dict"):  # the other layers: their own
        fixed = get_sigma_model(  # the fix the error names works
            model,
            SigmaConfig(rank=2),
            full_precision_state_dict={
                "model.layers.0.mlp.up_proj.weight": layer.weight.as_subclass(torch.Tensor)
            },
        )
    assert "model.layers.0.mlp.up_proj" in fixed.spectral_layers()
