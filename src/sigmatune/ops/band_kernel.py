"""Triton kernels for a band's mixes at any rank: the GEMM path's banded steps (r > kernels.MAX_RANK, e.g.
the full spectrum), one pass over the projection each instead of 2w + 1 shifted copies.

With M given by its column-aligned diagonals C (2w+1, r), C[w+o, j] = M[j−o, j] (structures.py):

    mix                 (P M)_j  = Σ_o P_{j−o} C[w+o, j]          (backward: Q M)
    mix, transposed     (P Mᵀ)_j = Σ_o P_{j+o} C[w+o, j+o]        (forward)
    grad                dC[w+o, j] = Σ_rows Q_{j−o} P_j           (the band of Qᵀ P)

P and Q are (N, r) in any float dtype; the sums run in fp32; a mix is returned in P's dtype, a gradient in
fp32. A mix program owns a BLOCK_N × BLOCK_J tile of the output and reads the 2w + 1 shifted tiles it needs
(from L1/L2 after the first); a gradient program owns BLOCK_J columns of a group of rows (rows_per_group) and
writes one partial band, summed over the groups afterwards (no atomics). Eager calls launch through
launch.CachedLaunch; under torch.compile dynamo traces the kernels' launches.
"""

from __future__ import annotations

import torch

from ..core.structures.band import half_width
from . import transform_kernel as kernels
from .launch import CachedLaunch
from .transform_kernel import triton

if triton is not None:
    import triton.language as tl

    # fmt: off
    @triton.jit
    def _mix_kernel(P, C, OUT, N, R, stride_p, stride_out,
                    WIDTH: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # j (BJ,)
        row_ok = rows < N
        total = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
        for t in tl.static_range(0, 2 * WIDTH + 1):
            source = cols + (t - WIDTH) if TRANSPOSED else cols - (t - WIDTH)  # j + o, or j − o
            inside = (source >= 0) & (source < R) & (cols < R)
            p = tl.load(P + rows[:, None] * stride_p + source[None, :], mask=row_ok[:, None] & inside[None, :], other=0.0)
            c = tl.load(C + t * R + (source if TRANSPOSED else cols), mask=inside, other=0.0)
            total += p.to(tl.float32) * c.to(tl.float32)[None, :]
        keep = row_ok[:, None] & (cols < R)[None, :]
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :], total.to(OUT.dtype.element_ty), mask=keep)

    @triton.jit
    def _grad_kernel(Q, P, PARTIAL, N, R, stride_q, stride_p, rows_per_group,
                     WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        group = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # j (BJ,)
        first = group * rows_per_group
        for t in tl.static_range(0, 2 * WIDTH + 1):
            source = cols - (t - WIDTH)  # j − o
            inside = (source >= 0) & (source < R) & (cols < R)
            total = tl.zeros((BLOCK_J,), dtype=tl.float32)
            for start in range(first, first + rows_per_group, BLOCK_N):
                rows = start + tl.arange(0, BLOCK_N)
                ok = (rows < N)[:, None] & inside[None, :]
                q = tl.load(Q + rows[:, None] * stride_q + source[None, :], mask=ok, other=0.0)
                p = tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=ok, other=0.0)
                total += tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=0)
            tl.store(PARTIAL + (group * (2 * WIDTH + 1) + t) * R + cols, total, mask=cols < R)
    # fmt: on

    _launch_mix = CachedLaunch(_mix_kernel, kernels.INTERPRET)
    _launch_grad = CachedLaunch(_grad_kernel, kernels.INTERPRET)


BLOCK_N, BLOCK_J = (16, 16) if kernels.INTERPRET else (32, 128)
PROGRAMS = 4 * 132  # the gradient's programs: its row groups fill a Hopper GPU's 132 multiprocessors ~4 times
WARPS, STAGES = 4, 3  # Triton's defaults on CUDA


def mix(p: torch.Tensor, c: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """P M (or P Mᵀ when transposed) for a 2-D p (N, r) and a band C (2w+1, r); in p's dtype."""
    p = p if p.stride(-1) == 1 else p.contiguous()
    c = c.contiguous()
    n, r = p.shape
    out = torch.empty_like(p)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(r, BLOCK_J))
    arguments = (p, c, out, n, r, p.stride(0), out.stride(0))
    constants = dict(WIDTH=half_width(c), TRANSPOSED=transposed, BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J)
    _launch(_mix_kernel, _launch_mix, grid, arguments, constants)
    return out


def grad(q: torch.Tensor, p: torch.Tensor, w: int, tokens: int = 0) -> torch.Tensor:
    """dC (2w+1, r) fp32 with dC[w+o, j] = Σ_rows Q[:, j−o] P[:, j] (zero where row j − o is outside M);
    tokens > 0 (a multiple of BLOCK_N): one dC per block of that many rows, (n / tokens, 2w+1, r)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    p = p if p.stride(-1) == 1 else p.contiguous()
    n, r = p.shape
    rows = rows_per_group(n, r)
    if tokens:  # groups that never straddle two blocks: the largest multiple of BLOCK_N dividing tokens
        units = tokens // BLOCK_N
        rows = BLOCK_N * max(k for k in range(1, min(units, rows // BLOCK_N) + 1) if units % k == 0)
    groups = triton.cdiv(n, rows)
    partial = torch.empty((groups, 2 * w + 1, r), device=p.device, dtype=torch.float32)
    arguments = (q, p, partial, n, r, q.stride(0), p.stride(0), rows)
    constants = dict(WIDTH=w, BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J)
    _launch(_grad_kernel, _launch_grad, (groups, triton.cdiv(r, BLOCK_J)), arguments, constants)
    if tokens:
        return partial.view(n // tokens, -1, 2 * w + 1, r).sum(dim=1)
    return partial.sum(dim=0)


def rows_per_group(n: int, r: int) -> int:
    """Rows each program of the gradient sums (a multiple of BLOCK_N): groups × column blocks ≈ PROGRAMS, so
    that the programs fill the GPU and each one's chain of loads is short (512 rows a group left 128 programs
    of 48 serial loads at N = 4,096, r = 2,048). Under the interpreter, two blocks (the tests cover groups)."""
    if kernels.INTERPRET:
        return 2 * BLOCK_N
    groups = max(1, min(triton.cdiv(n, BLOCK_N), PROGRAMS // triton.cdiv(r, BLOCK_J)))
    return triton.cdiv(triton.cdiv(n, groups), BLOCK_N) * BLOCK_N


def _launch(kernel, cached: CachedLaunch, grid: tuple, arguments: tuple, constants: dict) -> None:
    """kernel[grid](*arguments, **constants): traced as that under torch.compile (dynamo sees a Triton
    launch), else through the cached launcher (eager: no JIT work per call)."""
    if torch.compiler.is_compiling():
        kernel[grid](*arguments, **constants, num_warps=WARPS, num_stages=STAGES)
    else:
        cached(grid, arguments, constants, WARPS, STAGES)
