"""The Triton kernels for a band's mixes (the GEMM path's, any rank) against the torch mixes in fp64.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); on a GPU machine the same
tests run the compiled kernels. Shapes include N and r not multiples of the blocks and bands wider than r.
"""

from __future__ import annotations

import pytest
import torch

from sigmatune.core import transform as F
from sigmatune.core.backends import named
from sigmatune.core.structures import band
from sigmatune.core.structures.band import valid_part
from sigmatune.core.structures.diagonal import Diagonal
from sigmatune.ops import band_kernel as band_kernels
from sigmatune.ops import transform_kernel as kernels
from sigmatune.ops.backends import using

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 3, 1), (37, 20, 2), (50, 150, 4), (9, 6, 5)]  # (N, r, w)


def case(n, r, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, r, generator=g, dtype=torch.float64)
    q = torch.randn(n, r, generator=g, dtype=torch.float64)
    c = valid_part(torch.randn(2 * w + 1, r, generator=g, dtype=torch.float64))
    return p.to(DEVICE, dtype), q.to(DEVICE, dtype), c.to(DEVICE, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, r, w", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_mix_matches_the_torch_mix(dtype, n, r, w, transposed):
    p, _, c = case(n, r, w, dtype)
    out = band_kernels.mix(p, c, transposed=transposed)
    reference = band.band_mix_transposed if transposed else band.band_mix
    expected = reference(p.double(), c.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == p.shape
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, r, w", [*SHAPES, (1100, 7, 2)])  # more rows than one row group
def test_grad_matches_the_band_of_q_transpose_p(dtype, n, r, w):
    p, q, _ = case(n, r, w, dtype, seed=1)
    grad = band_kernels.grad(q, p, w)
    expected = band.band_grad(q.double(), p.double(), w)
    assert grad.dtype == torch.float32 and grad.shape == (2 * w + 1, r)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-4 * n**0.5)


@pytest.mark.parametrize("blocks, units, w", [(1, 3, 0), (3, 2, 0), (2, 5, 1)])
def test_grad_per_block_sums_each_blocks_own_rows(blocks, units, w):
    """tokens > 0 (adapters trained together): one gradient per block of rows, each over its rows only —
    the row groups never straddle two blocks (5 units: a group size of 1 or 5 units, not 2)."""
    tokens = units * band_kernels.BLOCK_N
    p, q, _ = case(blocks * tokens, 9, w, torch.float32, seed=2)
    grad = band_kernels.grad(q, p, w, tokens)
    assert grad.dtype == torch.float32 and grad.shape == (blocks, 2 * w + 1, 9)
    for b in range(blocks):
        own = slice(b * tokens, (b + 1) * tokens)
        expected = band.band_grad(q[own].double(), p[own].double(), w)
        torch.testing.assert_close(grad[b].double(), expected, rtol=1e-5, atol=1e-4 * tokens**0.5)


def test_the_gemm_path_takes_the_per_block_grad_for_a_wide_diagonal():
    """Rows over more directions than torch's product serves (r > 256): TritonGemms' rows_grad by the kernel
    equals the torch one."""
    tokens, r = 2 * band_kernels.BLOCK_N, 272
    g = torch.Generator().manual_seed(6)
    q, p = (torch.randn(3, tokens, r, generator=g).to(DEVICE) for _ in range(2))
    kernel = named("band").rows_grad(Diagonal(), q, p, torch.zeros(3, r, device=DEVICE))
    torch.testing.assert_close(kernel, (q.double() * p.double()).sum(dim=1).float(), rtol=1e-5, atol=1e-4)


def test_the_gemm_path_uses_them_and_matches_the_torch_mixes():
    """transform() with a band over more directions than the fused kernel takes: values and gradients with
    the mix kernels against the torch mixes (fp32)."""
    n, d, r, w = 23, 160, 150, 3
    g = torch.Generator().manual_seed(4)
    a = torch.randn(n, d, generator=g).to(DEVICE)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.to(DEVICE, torch.float32)
    bands = valid_part(torch.randn(2 * w + 1, r, generator=g) * 0.3).to(DEVICE)
    results = {}
    for use in (False, True):
        x, c = a.clone().requires_grad_(True), bands.clone().requires_grad_(True)
        with using("band" if use else "torch"):
            out = F.transform(x, basis, c, shift=torch.ones(r, device=DEVICE), structure=band.Band(w))
        (out * torch.linspace(-1, 1, d, device=DEVICE)).square().sum().backward()
        results[use] = (out.detach(), x.grad, c.grad)
    for plain, kernel in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(kernel, plain, rtol=2e-4, atol=2e-4)


def test_the_gradients_row_groups_fill_the_gpu_and_cover_every_row(monkeypatch):
    """rows_per_group on a GPU: a multiple of the row block, every row in some group, and about PROGRAMS
    programs for a wide projection (the 1.1B Llama's full spectrum: 32 groups of 128 rows at N = 4,096)."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    block_n, block_j = 32, 128
    monkeypatch.setattr(band_kernels, "BLOCK_N", block_n)
    monkeypatch.setattr(band_kernels, "BLOCK_J", block_j)
    assert band_kernels.rows_per_group(4096, 2048) == 128
    for n, r in [(1, 3), (1100, 7), (4096, 2048), (16384, 5632), (50, 150)]:
        rows = band_kernels.rows_per_group(n, r)
        groups = -(-n // rows)
        assert rows % block_n == 0 and groups * rows >= n
        assert groups * -(-r // block_j) <= band_kernels.PROGRAMS + -(-r // block_j)
