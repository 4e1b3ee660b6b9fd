"""The band structure against a dense two-sided fp64 reference: values, gradients, the banded mixes,
bands over non-consecutive stored columns, merge/unmerge, LoRA factors, mixed rows and the errors."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, SpectralLinear
from sigmatune.core.structures import band
from sigmatune.core.structures.band import Band, band_to_dense, dense_to_band, valid_part
from sigmatune.core.structures.diagonal import Diagonal
from sigmatune.core.svd import SpectrumRequest, compute_spectra
from sigmatune.core.weights import fingerprint
from tests.core.test_layer import SHAPES, make_linear
from tests.reference import reference_band_weight


def banded(layer_or_shape, band: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    """Random diagonals (2b+1, r) of a band (the corner entries outside M zero)."""
    r = layer_or_shape
    g = torch.Generator().manual_seed(seed)
    return valid_part(torch.randn(2 * band + 1, r, generator=g, dtype=torch.float64) * scale)


def wrap_band(linear, indices, band, stored=None, seed=0) -> SpectralLinear:
    """A SpectralLinear storing `stored` (default: indices) with one active band adapter over `indices`."""
    stored = sorted(stored or indices)
    request = SpectrumRequest("layer", linear.weight, stored, "exact", fingerprint(linear.weight))
    layer = SpectralLinear(linear, compute_spectra([request], progress=False)["layer"])
    layer.add_adapter("default", indices, "multiplicative", structure=Band(band))
    layer.set_adapter("default")
    with torch.no_grad():
        layer.sigma_adapters["default"].vector.copy_(banded(len(indices), band, seed))
    return layer


def test_banded_mixes_equal_dense_products():
    c = banded(7, 2)
    p = torch.randn(5, 7, dtype=torch.float64)
    m = band_to_dense(c)
    torch.testing.assert_close(band.band_mix(p, c), p @ m, rtol=0, atol=1e-12)
    torch.testing.assert_close(band.band_mix_transposed(p, c), p @ m.T, rtol=0, atol=1e-12)
    assert torch.equal(dense_to_band(m, 2), c)
    assert (m.triu(3) == 0).all() and (m.tril(-3) == 0).all()  # |i − j| ≤ b only
    q = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(band.band_grad(p, q, 2), dense_to_band(p.T @ q, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", SHAPES)
@pytest.mark.parametrize("band", [1, 2])
@pytest.mark.parametrize("selection", [[0, 1, 2, 3, 4], [1, 3, 4, 6, 7]])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_reference_in_fp64(side, band, selection, bias):
    linear = make_linear(SHAPES[side], bias=bias)
    layer = wrap_band(linear, selection, band)
    matrix = band_to_dense(layer.sigma_adapters["default"].vector.detach())
    expected_weight = reference_band_weight(linear.weight.detach(), selection, matrix, side)
    x = torch.randn(2, 3, linear.in_features, dtype=torch.float64)
    expected = x @ expected_weight.T + (0 if linear.bias is None else linear.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("side", SHAPES)
def test_a_band_over_columns_that_are_not_consecutive(side):
    """Another adapter stores directions between this one's: the band spreads over the stored basis."""
    linear = make_linear(SHAPES[side])
    selection = [0, 2, 5, 6]
    layer = wrap_band(linear, selection, 2, stored=[0, 1, 2, 3, 5, 6, 7])
    assert layer.sigma_adapters["default"].positions.tolist() == [0, 2, 4, 5]
    assert layer.scales("default").shape == (2 * 4 + 1, 7)  # widened from b = 2 to the widest gap, 4
    matrix = band_to_dense(layer.sigma_adapters["default"].vector.detach())
    expected_weight = reference_band_weight(linear.weight.detach(), selection, matrix, side)
    x = torch.randn(4, linear.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected_weight.T + linear.bias.detach(), rtol=0, atol=1e-10)
    adapter = layer.sigma_adapters["default"]
    plan = adapter._plan  # computed once for these positions, reused by every forward
    assert plan is not None and plan[0] is adapter.positions
    layer(x)
    assert adapter._plan is plan
    spread_dense = band_to_dense(layer.scales("default"))  # the band over stored columns = M scattered
    assert torch.equal(
        spread_dense[adapter.positions][:, adapter.positions], band_to_dense(valid_part(adapter.vector))
    )
    assert torch.equal(
        band_to_dense(Diagonal().spread(torch.ones(3), torch.tensor([0, 2, 3]), 4)),
        torch.diag(torch.tensor([1.0, 0, 1, 1])),
    )


@pytest.mark.parametrize("side", SHAPES)
def test_gradients_pass_gradcheck_and_match_the_reference(side):
    linear = make_linear(SHAPES[side])
    layer = wrap_band(linear, [0, 1, 2, 3], 1)
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    v = layer.sigma_adapters["default"].vector.detach().clone().requires_grad_(True)

    def adapted(x, v):
        return torch.func.functional_call(layer, {"sigma_adapters.default.vector": v}, (x,))

    assert torch.autograd.gradcheck(adapted, (x, v))
    adapted(x, v).square().sum().backward()
    matrix = band_to_dense(v.detach()).requires_grad_(True)
    weight = reference_band_weight(linear.weight.detach(), [0, 1, 2, 3], matrix, side)
    (x.detach() @ weight.T + linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(v.grad, dense_to_band(matrix.grad, 1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("side", SHAPES)
def test_merge_unmerge_and_lora_factors_are_exact(side):
    linear = make_linear(SHAPES[side])
    original = linear.weight.detach().clone()
    layer = wrap_band(linear, [0, 1, 2, 3, 4], 2)
    x = torch.randn(5, linear.in_features, dtype=torch.float64)
    adapted = layer(x)
    a, b = layer.lora_factors("default")
    layer.merge()
    layer.merge()  # a second merge changes nothing
    torch.testing.assert_close(linear(x), adapted, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        (b.double() @ a.double()), linear.weight.detach() - original, rtol=0, atol=1e-6
    )
    layer.unmerge()
    torch.testing.assert_close(linear.weight.detach(), original, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-10)


def test_rows_of_bands_equal_each_band_alone():
    linear = make_linear(SHAPES["output"])
    layer = wrap_band(linear, [0, 1, 2, 3, 4], 1)
    c = layer.scales("default").detach()
    x = torch.randn(3, 4, linear.in_features, dtype=torch.float64)
    alone = layer(x)
    layer.serve_rows(torch.stack([c, torch.zeros_like(c), 2 * c]))
    served = layer(x)
    layer.serve_rows(None)
    torch.testing.assert_close(served[0], alone[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(served[1], linear(x[1]), rtol=0, atol=1e-10)
    with torch.no_grad():
        layer.sigma_adapters["default"].vector.mul_(2)
    torch.testing.assert_close(served[2], layer(x)[2], rtol=0, atol=1e-10)  # mixes are linear in M


def test_bad_bands_are_refused():
    with pytest.raises(ValueError, match="band must be an int ≥ 0"):
        SigmaConfig(structure="band", band=-1)
    with pytest.raises(ValueError, match="update='additive' cannot express it"):
        SigmaConfig(structure="band", band=1, update="additive")
    with pytest.raises(ValueError, match="set structure='band'"):
        SigmaConfig(band=2)
    with pytest.raises(ValueError, match="band=3 needs more selected directions than layer 'q' has"):
        Band(3).check(3, "q")
