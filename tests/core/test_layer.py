"""SpectralLinear against the two-sided fp64 reference: values, gradients, dtypes, adapters, merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigmatune import SigmaConfig, SpectralLinear
from sigmatune.core.svd import SpectrumRequest, compute_spectra
from sigmatune.core.weights import fingerprint
from tests.reference import reference_linear, reference_weight

SHAPES = {"input": (12, 8), "output": (8, 12)}  # (out, in): input side when in ≤ out
SELECTIONS = {
    "principal": dict(rank=3),
    "minor": dict(rank=3, selection="minor"),
    "explicit": dict(selection=[0, 2, 5]),
    "full": dict(rank="full"),
}


def make_linear(shape, bias=True, dtype=torch.float64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    out_features, in_features = shape
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def wrap(linear: nn.Linear, config: SigmaConfig, name="default", seed=0) -> SpectralLinear:
    """A SpectralLinear with one active adapter whose vector is random (seeded)."""
    indices = config.indices_for("layer", min(linear.weight.shape))
    request = SpectrumRequest("layer", linear.weight, indices, "exact", fingerprint(linear.weight))
    layer = SpectralLinear(linear, compute_spectra([request], progress=False)["layer"])
    layer.add_adapter(name, indices, config.update)
    layer.set_adapter(name)
    with torch.no_grad():
        vector = layer.sigma_adapters[name].vector
        vector.copy_(torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return layer


@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("update", ["additive", "multiplicative"])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_two_sided_reference_in_fp64(side, update, selection, bias):
    linear = make_linear(SHAPES[side], bias=bias)
    config = SigmaConfig(update=update, svd="exact", **SELECTIONS[selection])
    layer = wrap(linear, config)
    assert layer.side == side
    assert layer.sigma_basis.shape == (min(SHAPES[side]), len(config.indices_for("layer", 8)))
    indices = config.indices_for("layer", 8)
    vector = layer.sigma_adapters["default"].vector.detach()
    for x in (
        torch.randn(5, linear.in_features, dtype=torch.float64),
        torch.randn(2, 3, linear.in_features).double(),
    ):
        expected = reference_linear(x, linear.weight.detach(), linear.bias, indices, vector, update)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("update", ["additive", "multiplicative"])
def test_gradients_pass_gradcheck(side, update):
    layer = wrap(make_linear(SHAPES[side]), SigmaConfig(rank=4, update=update, svd="exact"))
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    v = layer.sigma_adapters["default"].vector.detach().clone().requires_grad_(True)

    def adapted(x, v):  # the layer as a function of its input and its trained vector
        return torch.func.functional_call(layer, {"sigma_adapters.default.vector": v}, (x,))

    assert torch.autograd.gradcheck(adapted, (x, v))


@pytest.mark.parametrize("side", SHAPES)
def test_gradient_of_vector_matches_reference(side):
    linear = make_linear(SHAPES[side])
    config = SigmaConfig(rank=4, update="multiplicative", svd="exact")
    layer = wrap(linear, config)
    x = torch.randn(6, linear.in_features, dtype=torch.float64)
    layer(x).square().sum().backward()
    v = layer.sigma_adapters["default"].vector.detach().clone().requires_grad_(True)
    reference_linear(
        x, linear.weight.detach(), linear.bias, list(range(4)), v, "multiplicative"
    ).square().sum().backward()
    torch.testing.assert_close(layer.sigma_adapters["default"].vector.grad, v.grad, rtol=1e-9, atol=1e-10)
    assert linear.weight.grad is None  # the base weight never gets a gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", SHAPES)
def test_low_precision_follows_reference(dtype, side):
    linear64 = make_linear(SHAPES[side])
    config = SigmaConfig(rank=4, svd="exact")
    layer = wrap(make_linear(SHAPES[side]).to(dtype), config)
    vector = layer.sigma_adapters["default"].vector
    assert vector.dtype == torch.float32 and layer.sigma_basis.dtype == dtype
    x = torch.randn(4, 3, linear64.in_features, dtype=torch.float64)
    expected = reference_linear(
        x, linear64.weight.detach(), linear64.bias, list(range(4)), vector.detach(), "multiplicative"
    )
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    cpu = wrap(make_linear(SHAPES["input"]).float(), SigmaConfig(rank=4, svd="exact"))
    gpu = wrap(make_linear(SHAPES["input"]).float().cuda(), SigmaConfig(rank=4, svd="exact"))
    assert gpu.sigma_basis.is_cuda and gpu.sigma_adapters["default"].vector.is_cuda
    x = torch.randn(5, 8)
    torch.testing.assert_close(gpu.to(dtype)(x.cuda().to(dtype)).float().cpu(), cpu(x), rtol=3e-2, atol=3e-2)


def test_adapters_are_keyed_by_name_and_switch():
    linear = make_linear(SHAPES["input"])
    layer = wrap(linear, SigmaConfig(rank=4, svd="exact"), name="a", seed=1)
    layer.add_adapter("b", [1, 3], "additive")
    with torch.no_grad():
        layer.sigma_adapters["b"].vector.copy_(torch.tensor([0.5, -0.25]))
    x = torch.randn(3, 8, dtype=torch.float64)
    out_a = layer(x)
    layer.set_adapter("b")
    expected_b = reference_linear(
        x, linear.weight.detach(), linear.bias, [1, 3], torch.tensor([0.5, -0.25]), "additive"
    )
    torch.testing.assert_close(layer(x), expected_b, rtol=0, atol=1e-10)
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    layer.set_adapter("a")
    torch.testing.assert_close(layer(x), out_a, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no adapter 'c'"):
        layer.set_adapter("c")
    with pytest.raises(ValueError, match="not stored"):
        layer.add_adapter("c", [5], "additive")


@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("update", ["additive", "multiplicative"])
def test_merge_equals_forward_and_unmerge_restores(side, update):
    linear = make_linear(SHAPES[side])
    original = linear.weight.detach().clone()
    layer = wrap(linear, SigmaConfig(rank=5, update=update, svd="exact"))
    x = torch.randn(4, linear.in_features, dtype=torch.float64)
    adapted = layer(x).detach()
    layer.merge()
    vector = layer.sigma_adapters["default"].vector.detach()
    torch.testing.assert_close(
        linear.weight.detach(), reference_weight(original, list(range(5)), vector, update)
    )
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-10)
    merged = linear.weight.detach().clone()
    layer.merge()  # a second merge changes nothing
    assert torch.equal(linear.weight, merged)
    layer.unmerge()
    torch.testing.assert_close(linear.weight.detach(), original, rtol=0, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(linear.weight.detach(), original, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-10)


def test_extended_basis_keeps_every_adapter_exact():
    linear = make_linear(SHAPES["output"])
    layer = wrap(linear, SigmaConfig(rank=2, svd="exact"), seed=3)
    x = torch.randn(3, 12, dtype=torch.float64)
    before = layer(x).detach()
    wider = compute_spectra(
        [SpectrumRequest("layer", linear.weight, [0, 1, 4, 6], "exact", fingerprint(linear.weight))],
        progress=False,
    )["layer"]
    layer.extend_spectrum(wider)
    assert layer.stored_rank == 4
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-10)
    layer.add_adapter("wide", [1, 6], "multiplicative")
    layer.set_adapter("wide")
    with torch.no_grad():
        layer.sigma_adapters["wide"].vector.copy_(torch.tensor([0.2, 0.7]))
    expected = reference_linear(
        x, linear.weight.detach(), linear.bias, [1, 6], torch.tensor([0.2, 0.7]), "multiplicative"
    )
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("side_shape", [(32, 48), (48, 32)])
def test_autocast_trains_in_one_dtype_and_matches_fp32(side_shape):
    """Under autocast the transform computes in autocast's dtype (forward and backward alike); its
    input gradient comes back in the input's dtype. Full rank: the GEMM path on any device."""
    linear = make_linear(side_shape, dtype=torch.float32)
    layer = wrap(linear, SigmaConfig(rank="full", svd="exact", init="normal", init_std=0.1))
    x = torch.randn(4, 5, side_shape[1], generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    vector = layer.sigma_adapters["default"].vector
    mixed_grads = (x.grad.clone(), vector.grad.clone())
    assert x.grad.dtype == torch.float32 and out.dtype == torch.bfloat16
    x.grad, vector.grad = None, None
    reference = layer(x)
    reference.square().sum().backward()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    for mixed, exact in zip(mixed_grads, (x.grad, vector.grad), strict=True):
        assert float((mixed - exact).norm() / exact.norm()) < 0.05


@pytest.mark.parametrize("side", SHAPES)
def test_served_rows_each_compute_their_own_scales(side):
    """The bank's seam: row b of a mixed batch computes with row_scales[b]; None gives the layer back."""
    linear = make_linear(SHAPES[side])
    config = SigmaConfig(rank=4, svd="exact")
    layer = wrap(linear, config)
    x = torch.randn(3, 5, linear.in_features, dtype=torch.float64)
    alone = layer(x)  # the active adapter on every row
    g = layer.scales("default").detach()
    layer.serve_rows(torch.stack([g, torch.zeros_like(g), 0.5 * g]))  # (B, R): adapter, base, half
    served = layer(x)
    layer.serve_rows(None)
    half = reference_linear(
        x[2], linear.weight.detach(), linear.bias, list(range(4)), 0.5 * g, "multiplicative"
    )
    torch.testing.assert_close(served[0], alone[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(served[1], linear(x[1]), rtol=0, atol=1e-10)
    torch.testing.assert_close(served[2], half, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x), alone, rtol=0, atol=0)
