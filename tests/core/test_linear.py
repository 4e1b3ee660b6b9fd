"""The eager path of an adapted nn.Linear (core/linear.py): the same values and gradients as the two-sided fp64
reference and as the generic path (the transform's Function, then the base layer), by torch ops (a diagonal
g), through the kernel and through the GEMMs (the full spectrum, the CPU), and the generic path wherever the
one-node path could not be exact (hooks, a trainable weight, autocast, a subclass).

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which no backend chooses
by itself there: backends.using() makes them."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import sigmatune.core.layer
from sigmatune import SigmaConfig
from sigmatune.core import linear as fused_linear
from sigmatune.core.structures.band import Band, band_to_dense
from sigmatune.ops import transform_kernel as kernels
from sigmatune.ops.backends import using
from tests.core.test_layer import SHAPES, make_linear, wrap
from tests.reference import reference_band_weight, reference_weight

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def use():
    """use(name): the rest of the test runs on that backend; by default the fused kernel (on CPU too)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(using("transform"))
        yield lambda name: stack.enter_context(using(name))


@pytest.fixture
def calls(monkeypatch):
    """Which way the fused path ran, each time it ran: "function" or "ops"."""
    seen = []
    apply, by_ops = fused_linear._AdaptedLinear.apply, fused_linear._diagonal_by_ops
    monkeypatch.setattr(fused_linear._AdaptedLinear, "apply", lambda *a: seen.append("function") or apply(*a))
    monkeypatch.setattr(fused_linear, "_diagonal_by_ops", lambda *a: seen.append("ops") or by_ops(*a))
    return seen


def adapted(side, bias, band=0, seed=0):
    """An fp32 SpectralLinear on DEVICE, rank 5 (a band of half-width `band` when > 0), random coefficients,
    and its fp64 reference weight W'."""
    linear = make_linear(SHAPES[side], bias=bias, dtype=torch.float64, seed=seed)
    layer = wrap(linear, SigmaConfig(rank=5, svd="exact"), seed=seed)
    indices = list(layer.stored_indices)
    if band:
        layer.delete_adapter("default")
        layer.add_adapter("default", indices, "multiplicative", structure=Band(band))
        layer.set_adapter("default")
        with torch.no_grad():
            vector = layer.sigma_adapters["default"].vector
            vector.copy_(torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        matrix = band_to_dense(layer.own_scales("default").detach().double())  # (r, r)
        expected = reference_band_weight(linear.weight.detach(), indices, matrix, side)
    else:
        vector = layer.sigma_adapters["default"].vector.detach()
        expected = reference_weight(linear.weight.detach(), indices, vector, "multiplicative")
    return layer.float().to(DEVICE), expected


@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("band", "backend"), [(0, "torch"), (0, "transform"), (2, "transform"), (2, "torch"), (2, "band")]
)  # a diagonal by the torch backend takes the ops; anything else the Function
def test_values_and_gradients_match_the_reference_and_the_generic_path(
    side, bias, band, backend, calls, use, monkeypatch
):
    use(backend)
    layer, weight = adapted(side, bias, band)
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    upstream = torch.randn(3, 7, layer.out_features, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(sigmatune.core.layer, "adapted_linear", lambda *_: None)
        inputs = x.clone().requires_grad_(True)
        out = layer(inputs)
        (out * upstream).sum().backward()
        vector = layer.sigma_adapters["default"].vector
        results.append((out.detach(), inputs.grad, vector.grad.clone()))
        vector.grad = None
    assert calls == [
        "ops" if (band, backend) == (0, "torch") else "function"
    ]  # the first run, not the second
    (out, grad_x, grad_v), (generic_out, generic_x, generic_v) = results
    base = layer.base_layer
    weight = weight.to(DEVICE)
    expected = x.double() @ weight.T + (0 if base.bias is None else base.bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_x.double(), upstream.double() @ weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, generic_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, generic_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_v, generic_v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False])
def test_the_vectors_gradient_matches_the_fp64_reference(kernel, calls, use):
    """dg against autograd through the fp64 reference weight, for both sides: through the kernel, by the ops."""
    if not kernel:
        use("torch")
    for side in SHAPES:
        layer, _ = adapted(side, bias=True, seed=3)
        x = torch.randn(9, layer.in_features, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        layer(x).square().sum().backward()
        linear = make_linear(SHAPES[side], bias=True, dtype=torch.float64, seed=3)
        vector = layer.sigma_adapters["default"].vector.detach().cpu().double().requires_grad_(True)
        weight = reference_weight(
            linear.weight.detach(), list(layer.stored_indices), vector, "multiplicative"
        )
        (x.cpu().double() @ weight.T + linear.bias.detach()).square().sum().backward()
        got = layer.sigma_adapters["default"].vector.grad.cpu().double()
        torch.testing.assert_close(got, vector.grad, rtol=1e-3, atol=1e-4)
    assert calls == ["function" if kernel else "ops"] * 2


def test_hooks_a_trainable_weight_autocast_and_subclasses_take_the_generic_path(calls):
    layer, _ = adapted("input", bias=True)
    x = torch.randn(4, layer.in_features, device=DEVICE)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda *_: seen.append(1))
    layer(x)
    handle.remove()
    assert seen == [1] and calls == []  # the hook ran: the base layer was called
    global_handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    layer(x)
    global_handle.remove()
    assert calls == []
    layer.base_layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and calls == []
    layer.base_layer.weight.requires_grad_(False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and calls == []

    class Subclass(nn.Linear):
        pass

    layer.base_layer.__class__ = Subclass
    layer(x)
    assert calls == []
    layer.base_layer.__class__ = nn.Linear
    layer(x)
    assert calls == ["function"]


def test_a_bias_kept_as_a_buffer_takes_the_generic_path(calls):
    """A layer whose bias is not among its parameters (re-registered as a buffer) is left to its own forward,
    which adds that bias; the fused path reads weight and bias from the parameters only."""
    layer, weight = adapted("input", bias=True)
    base = layer.base_layer
    bias = base.bias.detach().clone()
    del base.bias
    base.register_buffer("bias", bias)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = layer(x)
    assert calls == []
    expected = x.double() @ weight.to(DEVICE).T + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", SHAPES)
def test_a_bf16_layer_by_ops_matches_the_reference_to_bf16_rounding(side, calls, use):
    """In bf16 the ops round g to bf16 and compute dg in bf16: output, dx and dg within bf16's rounding of the
    fp64 reference (a relative error of a few 2⁻⁸, not more)."""
    use("torch")
    layer, _ = adapted(side, bias=True, seed=5)
    layer.base_layer.to(torch.bfloat16)  # a bf16 model; the adapter's vector stays fp32
    layer.sigma_basis = layer.sigma_basis.to(torch.bfloat16)
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    inputs = x.to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(64, layer.out_features, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    (layer(inputs).float() * upstream).sum().backward()
    assert calls == ["ops"]
    linear = make_linear(SHAPES[side], bias=True, dtype=torch.float64, seed=5)
    vector = layer.sigma_adapters["default"].vector.detach().cpu().double().requires_grad_(True)
    reference = reference_weight(linear.weight.detach(), list(layer.stored_indices), vector, "multiplicative")
    x64 = inputs.detach().cpu().double().requires_grad_(True)
    ((x64 @ reference.T + linear.bias.detach()) * upstream.cpu().double()).sum().backward()

    def relative(got, expected):
        return float((got.cpu().double() - expected).norm() / expected.norm())

    got = layer.sigma_adapters["default"].vector.grad
    assert got.dtype == torch.float32
    assert relative(inputs.grad, x64.grad) < 2e-2
    assert relative(got, vector.grad) < 2e-2


@pytest.mark.parametrize("keeps_input", [True, False])
def test_the_full_spectrum_by_ops_keeps_x_in_place_of_the_projection(keeps_input, calls, use, monkeypatch):
    """A full-spectrum input-side layer by the ops on CUDA keeps x, not P = x B (the same size, and shared
    with the layers that read the same x), and recomputes P in backward: the same values and gradients."""
    use("torch")
    monkeypatch.setattr(fused_linear, "keeps_input", lambda *_: keeps_input)  # CUDA only by itself
    linear = make_linear(SHAPES["input"], bias=True, dtype=torch.float64, seed=9)
    layer = wrap(linear, SigmaConfig(rank="full", svd="exact"), seed=9).to(DEVICE)
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = x.to(DEVICE).requires_grad_(True)
    with torch.no_grad():
        layer.sigma_adapters["default"].vector.normal_(0, 0.3)
    vector = layer.sigma_adapters["default"].vector
    recomputed, unpack = [], fused_linear._Recomputed.unpack
    monkeypatch.setattr(
        fused_linear._Recomputed,
        "unpack",
        lambda self, saved: (
            recomputed.append(isinstance(saved, fused_linear._Recomputed)) or unpack(self, saved)
        ),
    )
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer(x)
    out.square().sum().backward()
    assert calls == ["ops"]
    reference = reference_weight(
        linear.weight.detach().to(DEVICE), list(layer.stored_indices), vector.detach(), "multiplicative"
    )
    torch.testing.assert_close(out, x.detach() @ reference.T + linear.bias.to(DEVICE))
    x64 = x.detach().clone().requires_grad_(True)
    vector64 = vector.detach().clone().requires_grad_(True)
    weight = reference_weight(
        linear.weight.detach().to(DEVICE), list(layer.stored_indices), vector64, "multiplicative"
    )
    (x64 @ weight.T + linear.bias.to(DEVICE)).square().sum().backward()
    torch.testing.assert_close(x.grad, x64.grad)
    torch.testing.assert_close(vector.grad, vector64.grad)
    assert any(recomputed) is keeps_input  # backward recomputed P from x
    projection_kept = any(t.shape == (6, layer.stored_rank) and t.data_ptr() != x.data_ptr() for t in kept)
    assert projection_kept is not keeps_input  # else autograd kept P (seen by these outer hooks)


def test_the_ops_keep_x_only_on_cuda_for_a_basis_as_wide_as_x_under_no_other_hooks():
    x = torch.zeros(4, 8)
    assert not fused_linear.keeps_input(x, torch.zeros(8, 8))  # the CPU: compute is the limit
    if torch.cuda.is_available():
        assert fused_linear.keeps_input(x.cuda(), torch.zeros(8, 8, device="cuda"))
        assert not fused_linear.keeps_input(x.cuda(), torch.zeros(8, 4, device="cuda"))
        with torch.no_grad():
            assert not fused_linear.keeps_input(x.cuda(), torch.zeros(8, 8, device="cuda"))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # e.g. checkpointing
            assert not fused_linear.keeps_input(x.cuda(), torch.zeros(8, 8, device="cuda"))
