"""The fused Triton kernel against the plain reference: values, projections, gradients.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); on a GPU
machine the same tests run the compiled kernel. Shapes include N not a multiple of the block,
r = 1, r not a power of two, d not a multiple of the block, and 3-D inputs.
"""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig
from sigmatune.core import transform as F
from sigmatune.core.structures.band import band_to_dense, dense_to_band, valid_part
from sigmatune.core.structures.registry import structure_of
from sigmatune.ops import transform_kernel as kernels
from sigmatune.ops.backends import using
from tests.core.test_layer import make_linear, wrap
from tests.ops.spills import spills
from tests.reference import reference_linear

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def case(n, d, r, dtype, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g_).to(DEVICE, dtype)
    basis = torch.linalg.qr(torch.randn(d, max(r, 1), generator=g_, dtype=torch.float64)).Q[:, :r]
    g = torch.randn(r, generator=g_) * 0.5
    shift = torch.randn(r, generator=g_)
    return a, basis.to(DEVICE, dtype), g.to(DEVICE), shift.to(DEVICE)


def reference(a, basis, g, shift=None):
    projection = a.double() @ basis.double()
    if shift is not None:
        projection = projection - shift.double()
    return a.double() + (projection * g.double()) @ basis.double().T, projection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d, r", [(1, 8, 1), (17, 33, 3), (50, 64, 16), (40, 40, 20)])
@pytest.mark.parametrize("with_shift", [False, True])
def test_forward_matches_reference(dtype, n, d, r, with_shift):
    a, basis, g, shift = case(n, d, r, dtype)
    out, projection, dg = kernels.fused_transform(a, basis, g, shift if with_shift else None)
    expected, expected_projection = reference(a, basis, g, shift if with_shift else None)
    tol = TOLERANCE[dtype] * 4
    assert out.dtype == dtype and out.shape == a.shape and dg is None
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert projection.shape == (n, kernels.padded_rank(r)) and projection.dtype == torch.float32
    torch.testing.assert_close(projection[:, :r].double(), expected_projection, rtol=tol, atol=tol)
    assert torch.all(projection[:, r:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, r", [(1, 8, 1), (37, 24, 5), (64, 48, 16)])
def test_backward_mode_reduces_dg_across_rows(dtype, n, d, r):
    a, basis, g, _ = case(n, d, r, dtype, seed=1)
    saved = torch.zeros(n, kernels.padded_rank(r), device=DEVICE)
    saved[:, :r] = torch.randn(n, r, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad_a, along, dg = kernels.fused_transform(a, basis, g, saved=saved)
    expected_grad, expected_along = reference(a, basis, g)
    tol = TOLERANCE[dtype] * 4
    torch.testing.assert_close(grad_a.double(), expected_grad, rtol=tol, atol=tol)
    assert along is None  # Q = a B is reduced against the saved P, not kept
    expected_dg = (expected_along * saved[:, :r].double()).sum(0)
    torch.testing.assert_close(dg.double(), expected_dg, rtol=tol, atol=tol * n**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks, d, r", [(1, 24, 5), (3, 40, 16), (4, 33, 20)])
@pytest.mark.parametrize("per", ["program", "row"])
def test_rows_give_each_block_its_own_g_and_its_own_gradient(dtype, blocks, d, r, per):
    """tokens > 0 (adapters trained together): each block of `tokens` rows is one call of its own g, forward
    and backward, and dg holds one row per block, summed over that block's rows only — per program where the
    programs' rows tile the blocks, else per row (blocks shorter than a program's rows, or not a multiple)."""
    program = kernels.launch_shape(kernels.padded_rank(r))[0]
    tokens = 2 * program if per == "program" else program // 2 + 3
    a, basis, _, shift = case(blocks * tokens, d, r, dtype, seed=3)
    g = torch.randn(blocks, r, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, projection, _ = kernels.fused_transform(a, basis, g, shift, transposed=True, tokens=tokens)
    grad_a, _, dg = kernels.fused_transform(a, basis, g, saved=projection, tokens=tokens)
    tol = TOLERANCE[dtype] * 4
    assert dg.shape == (blocks, r) and dg.dtype == torch.float32
    for b in range(blocks):
        own = slice(b * tokens, (b + 1) * tokens)
        expected, expected_projection = reference(a[own], basis, g[b], shift)
        torch.testing.assert_close(out[own].double(), expected, rtol=tol, atol=tol)
        expected_grad, expected_along = reference(a[own], basis, g[b])
        torch.testing.assert_close(grad_a[own].double(), expected_grad, rtol=tol, atol=tol)
        expected_dg = (expected_along * expected_projection).sum(0)
        torch.testing.assert_close(dg[b].double(), expected_dg, rtol=tol, atol=tol * tokens**0.5)


def test_rows_refuse_coefficients_that_are_no_diagonal_per_block():
    a, basis, _, _ = case(12, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"g \(blocks, r\) for 12 rows in blocks of 4, got \(3, 3, 4\)"):
        kernels.fused_transform(a, basis, torch.zeros(3, 3, 4, device=DEVICE), tokens=4)  # a band per block
    with pytest.raises(ValueError, match="in blocks of 5"):
        kernels.fused_transform(a, basis, torch.zeros(3, 4, device=DEVICE), tokens=5)  # 15 rows, not 12


def band_case(n, d, r, w, dtype, seed=0):
    a, basis, _, shift = case(n, d, r, dtype, seed)
    bands = torch.randn(2 * w + 1, r, generator=torch.Generator().manual_seed(seed + 7)) * 0.3
    return a, basis, bands.to(DEVICE), shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, r, w", [(1, 8, 2, 1), (17, 33, 5, 2), (50, 64, 16, 4), (40, 70, 20, 1)])
@pytest.mark.parametrize("transposed", [False, True])
def test_band_forward_mixes_by_m_or_its_transpose(dtype, n, d, r, w, transposed):
    """out = a + (P T) Bᵀ with T = M (backward) or Mᵀ (forward), M dense from its diagonals; entries of C
    outside M (row j − o out of range) are ignored."""
    a, basis, bands, shift = band_case(n, d, r, w, dtype)
    out, projection, grad = kernels.fused_transform(a, basis, bands, shift, transposed=transposed)
    dense = band_to_dense(valid_part(bands)).double()
    mix = dense.T if transposed else dense
    expected_projection = a.double() @ basis.double() - shift.double()
    expected = a.double() + (expected_projection @ mix) @ basis.double().T
    tol = TOLERANCE[dtype] * 4
    assert out.dtype == dtype and grad is None
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(projection[:, :r].double(), expected_projection, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, r, w", [(1, 8, 2, 1), (37, 24, 5, 2), (64, 48, 16, 4), (20, 30, 6, 5)])
def test_band_backward_reduces_the_band_of_q_transpose_p(dtype, n, d, r, w):
    """dC[w+o, j] = (Qᵀ P)[j − o, j] where that entry lies in M, else 0 (Q = a B, P the saved projection)."""
    a, basis, bands, _ = band_case(n, d, r, w, dtype, seed=1)
    saved = torch.zeros(n, kernels.padded_rank(r), device=DEVICE)
    saved[:, :r] = torch.randn(n, r, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad_a, along, grad = kernels.fused_transform(a, basis, bands, saved=saved)
    assert along is None
    q = a.double() @ basis.double()
    expected_grad_a = a.double() + (q @ band_to_dense(valid_part(bands)).double()) @ basis.double().T
    expected = q.T @ saved[:, :r].double()  # dM (r, r)
    tol = TOLERANCE[dtype] * 4
    torch.testing.assert_close(grad_a.double(), expected_grad_a, rtol=tol, atol=tol)
    assert grad.shape == bands.shape
    expected_band = dense_to_band(expected, w)  # (2w+1, r), zero where row j − o is outside M
    torch.testing.assert_close(grad.double(), expected_band, rtol=tol, atol=tol * n)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("band", [0, 2])
def test_fused_autograd_matches_the_plain_path(with_shift, band):
    """Through transform(): 3-D input, values and both gradients, fused vs GEMMs (fp32)."""
    a, basis, g, shift = case(2 * 19, 40, 6, torch.float32, seed=3)
    if band:
        g = valid_part(band_case(2 * 19, 40, 6, band, torch.float32, seed=3)[2])
    a = a.view(2, 19, 40)
    results = {}
    for fused in (False, True):
        x = a.clone().requires_grad_(True)
        w = g.clone().requires_grad_(True)
        with using("transform" if fused else "torch"):
            out = F.transform(
                x,
                basis,
                w,
                shift if with_shift else None,
                structure=structure_of("band", band) if band else F.DIAGONAL,
            )
        (out * torch.linspace(-1, 1, 40, device=DEVICE)).square().sum().backward()
        results[fused] = (out.detach(), x.grad, w.grad)
    for plain, fused in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(fused, plain, rtol=2e-4, atol=2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_uses_the_kernel_on_cuda_and_matches_fp64():
    linear64 = make_linear((300, 200))
    layer = wrap(make_linear((300, 200)).to("cuda", torch.bfloat16), SigmaConfig(rank=24, svd="exact"))
    x = torch.randn(3, 70, 200, dtype=torch.float64)
    vector = layer.sigma_adapters["default"].vector
    expected = reference_linear(
        x, linear64.weight.detach(), linear64.bias, list(range(24)), vector.detach().cpu(), "multiplicative"
    )
    out = layer(x.cuda().to(torch.bfloat16))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=5e-2, atol=5e-2)
    out.float().square().sum().backward()
    assert (
        vector.grad is not None and vector.grad.dtype == torch.float32 and torch.isfinite(vector.grad).all()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])  # input side, output side
def test_band_layer_uses_the_kernel_on_cuda_and_matches_fp64(shape):
    """A bf16 band layer on CUDA (r = 24, b = 2: the fused path) against a copy of it in fp64 on CPU (the
    GEMM path, the same stored basis and band)."""
    import copy

    from tests.core.test_band import wrap_band

    layer = wrap_band(make_linear(shape).to("cuda", torch.bfloat16), list(range(24)), 2)
    reference_layer = copy.deepcopy(layer).to("cpu", torch.float64)
    assert kernels.serves("cuda", torch.bfloat16, 24, 2)
    x = torch.randn(3, 70, shape[1], dtype=torch.float64)
    expected = reference_layer(x)
    out = layer(x.cuda().to(torch.bfloat16))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=5e-2, atol=5e-2)
    expected.square().sum().backward()
    out.float().square().sum().backward()
    grad = layer.sigma_adapters["default"].vector.grad
    expected_grad = reference_layer.sigma_adapters["default"].vector.grad
    assert grad.dtype == torch.float32 and grad.shape == expected_grad.shape
    error = (grad.double().cpu() - expected_grad).norm() / expected_grad.norm()
    assert error < 5e-2, error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cached_launch_reuses_the_compiled_kernel_only_for_the_same_specialisation(monkeypatch):
    """After the first call per key the JIT is not asked again; an input at an address the JIT would
    specialise differently (not 16-byte aligned) is a new key, and every result matches the reference."""
    launch = kernels._launch_transform
    asked = []
    run = kernels._transform_kernel.run
    monkeypatch.setattr(kernels._transform_kernel, "run", lambda *a, **k: asked.append(1) or run(*a, **k))
    launch.compiled.clear()
    a, basis, g, _ = case(70, 96, 24, torch.bfloat16, seed=6)
    storage = torch.randn(70 * 96 + 1, device="cuda").to(torch.bfloat16)
    unaligned = storage[1:].view(70, 96).copy_(a)  # 2 bytes past an aligned address
    for x in (a, a.clone(), unaligned, unaligned):
        out, _, _ = kernels.fused_transform(x, basis, g)
        expected, _ = reference(x, basis, g)
        torch.testing.assert_close(out.double(), expected, rtol=0.1, atol=0.1)
    assert len(asked) == len(launch.compiled) == 2


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (and its ptxas)")
def test_the_training_transforms_launch_shapes_keep_their_tiles_in_registers():
    """The transform kernel as launch_shape launches it for every padded rank, forward and backward, a
    diagonal and a band (and a diagonal per block of rows), compiled for sm_90 in a process without the
    interpreter: no spills."""
    cases = [
        ["transform", w, reduce, band] for w in (16, 32, 64, 128) for reduce in (0, 1) for band in (0, 2)
    ] + [["transform", w, reduce, 0, rows] for w in (64, 128) for reduce in (0, 1) for rows in (1, 2)]
    for case, (shape, spilled, report) in zip(cases, spills(cases), strict=True):
        assert spilled == 0, (case, shape, report)


def test_launch_shapes_are_data_per_gpu_with_a_default(monkeypatch):
    """launch_shape reads ops/launch_shapes.json: a GPU's own entry where it has one, else the default, the
    first rank bound that holds the width (the widest past them all)."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    table = kernels._shapes()["transform"]
    default = table["default"]
    assert kernels.launch_shape(16, "a GPU not in the table") == tuple(default["32"])
    assert kernels.launch_shape(64, "a GPU not in the table") == tuple(default["64"])
    assert kernels.launch_shape(512, "a GPU not in the table") == tuple(default["128"])
    monkeypatch.setitem(table, "Some GPU", {"128": [64, 8, 64, 2]})
    assert kernels.launch_shape(16, "Some GPU") == (64, 8, 64, 2)
