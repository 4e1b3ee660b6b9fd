"""Fused Triton kernels: the one-sided transform, used for both the forward and the backward pass.

    out = a + ((a B) − c) T Bᵀ          a (N, d), B (d, r), c (r,) or none

T is diag(g) for a diagonal adapter, g (r,), or a banded matrix given by its column-aligned diagonals
C (2w+1, r), C[w+o, j] = M[j−o, j] (structures.py): Mᵀ in the forward pass, M in the backward pass.

forward:  a = x (input side) or y (output side, c = b B removes the bias), returns out and P = a B − c
backward: a = dy (c none), returns dx = out and Q = dy B; also the coefficients' gradient,
          dg = Σ_rows Q ⊙ P_saved, or for a band dC[w+o, j] = Σ_rows Q[:, j−o] P_saved[:, j], reduced per
          block of rows (one partial row per program and diagonal, summed afterwards: no atomics)

One program owns BLOCK_N rows. Pass 1 streams the rows' d columns once to build P (BLOCK_N × r, fp32
accumulation); the mix is P ⊙ g, or P T with the r × r tile of T gathered from C (entries outside the band
masked: nothing dense is built on the host); pass 2 streams the rows again (mostly from L2) and writes
out = a + (P T) Bᵀ. Every product accumulates in fp32; g and C stay fp32; out has a's dtype.

Adapters trained together (transform_rows, ROWS): a diagonal per block of TOKENS consecutive rows, G (blocks, r),
each row's g loaded by its block; backward's dG (blocks, r) from each block's rows only — per program where
each program's rows lie in one block (ROWS 1), else each row's Q ⊙ P_saved written and summed per block (ROWS 2).

A served mixed-adapter batch's forward (decode rows, a gather from the adapters' tables inside, layers sharing an
input in one launch) is serving/ops/rows_kernel.py's, built from this file's two tiles (project_tile,
add_expanded_tile).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..core.structures.band import half_width
from .launch import CachedLaunch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the plain torch path is used everywhere
    triton = None

MAX_RANK = 128  # wider bases (e.g. rank="full") use cuBLAS through the plain path
MAX_BAND = 16  # wider bands (one spread over far-apart stored columns) too: the kernel unrolls 2w+1 diagonals
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests run kernels on CPU)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def serves(device: str, dtype: torch.dtype, rank: int, band: int) -> bool:
    """Whether the kernel can compute a call: r ≤ MAX_RANK directions, a band of half-width ≤ MAX_BAND
    (0: a diagonal), a float dtype it knows, on CUDA (or any device under Triton's interpreter)."""
    here = device == "cuda" or INTERPRET
    return triton is not None and here and rank <= MAX_RANK and band <= MAX_BAND and dtype in DTYPES


if triton is not None:
    # fmt: off
    @triton.jit
    def project_tile(A, B, rows, row_ok, ranks, rank_ok, first, D, stride_a, stride_b,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
        """Pass 1: P = a B over columns [first, D) for these rows, (BN, BR) fp32, streaming them once."""
        projection = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for start in range(first, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(B + cols[:, None] * stride_b + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            b = b.to(a.dtype)
            if UPCAST:  # Triton's interpreter multiplies bf16 wrongly: use fp32 there
                a, b = a.to(tl.float32), b.to(tl.float32)
            projection = tl.dot(a, b, projection, input_precision=PRECISION)
        return projection

    @triton.jit
    def add_expanded_tile(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, first, D, stride_a, stride_out, stride_b,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
        """Pass 2: out = a + scaled Bᵀ for these rows and columns [first, D), streaming them again (mostly
        from L2)."""
        for start in range(first, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            tile = row_ok[:, None] & col_ok[None, :]
            a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=tile, other=0.0)
            bt = tl.load(B + cols[None, :] * stride_b + ranks[:, None], mask=col_ok[None, :] & rank_ok[:, None], other=0.0)
            left, right = scaled.to(a.dtype), bt.to(a.dtype)
            if UPCAST:
                left, right = left.to(tl.float32), right.to(tl.float32)
            update = tl.dot(left, right, input_precision=PRECISION)  # (BN, BD) fp32
            tl.store(OUT + rows[:, None] * stride_out + cols[None, :], (a.to(tl.float32) + update).to(a.dtype), mask=tile)

    @triton.jit
    def _transform_kernel(
        A, B, G, C, OUT, PROJ, SAVED, PARTIAL,  # pointers
        N, D, R, TOKENS,  # sizes; TOKENS: rows per coefficient row (ROWS)
        stride_a, stride_out, stride_b,
        # ROWS 0: one g; 1: g per block of TOKENS rows, each program's rows in one block; 2: blocks of any length
        HAS_SHIFT: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        WIDTH: tl.constexpr, MIX: tl.constexpr,  # band half-width w; MIX 0: ⊙ g, 1: P Mᵀ, 2: P M
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        ranks = tl.arange(0, BLOCK_R)  # (BR,)
        rank_ok = ranks < R
        projection = project_tile(A, B, rows, row_ok, ranks, rank_ok, 0, D, stride_a, stride_b,
                              PRECISION, UPCAST, BLOCK_N, BLOCK_R, BLOCK_D)
        if HAS_SHIFT:
            projection -= tl.load(C + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
        keep = row_ok[:, None]  # all BLOCK_R columns: those past R hold zeros
        if not REDUCE:  # the forward pass's P, saved for backward (backward's Q is not kept)
            tl.store(PROJ + rows[:, None] * BLOCK_R + ranks[None, :], projection, mask=keep)
        if REDUCE and ROWS == 2:  # blocks the programs do not tile: each row's Q ⊙ P_saved, summed per block after
            saved = tl.load(SAVED + rows[:, None] * BLOCK_R + ranks[None, :], mask=keep, other=0.0)
            tl.store(PARTIAL + rows[:, None] * BLOCK_R + ranks[None, :], projection * saved, mask=keep)
        elif REDUCE:  # partial gradient for these rows, diagonal t = w + o: Σ_rows Q[:, j − o] P_saved[:, j]
            for t in tl.static_range(0, 2 * WIDTH + 1):  # by k = j − o: Σ_rows Q[:, k] P_saved[:, k + o] at j = k + o
                column = ranks + (t - WIDTH)  # j = k + o
                inside = (column >= 0) & (column < R) & rank_ok
                saved = tl.load(SAVED + rows[:, None] * BLOCK_R + column[None, :], mask=keep & inside[None, :], other=0.0)
                tl.store(PARTIAL + (pid * (2 * WIDTH + 1) + t) * BLOCK_R + column, tl.sum(projection * saved, axis=0), mask=inside)
        if ROWS:  # g per row: the row of G of each row's block (a diagonal)
            owner = rows // TOKENS
            g = tl.load(G + owner[:, None] * R + ranks[None, :], mask=keep & rank_ok[None, :], other=0.0)
            scaled = projection * g.to(tl.float32)  # (BN, BR) fp32
        elif MIX == 0:
            g = tl.load(G + ranks, mask=rank_ok, other=0.0).to(tl.float32)
            scaled = projection * g[None, :]  # (BN, BR) fp32
        else:  # the tile T[k, i] of Mᵀ (MIX 1: M[i, k]) or M (MIX 2: M[k, i]), gathered from C
            k, i = ranks[:, None], ranks[None, :]
            offset = k - i if MIX == 1 else i - k  # o of the entry, with column j = k (MIX 1) or i (MIX 2)
            column = k if MIX == 1 else i
            inside = (offset >= -WIDTH) & (offset <= WIDTH) & (k < R) & (i < R)
            mix = tl.load(G + (WIDTH + offset) * R + column, mask=inside, other=0.0).to(tl.float32)
            scaled = tl.dot(projection, mix, input_precision=PRECISION)  # (BN, BR) fp32
        add_expanded_tile(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, 0, D, stride_a, stride_out, stride_b,
                      PRECISION, UPCAST, BLOCK_D)
    # fmt: on

    _launch_transform = CachedLaunch(_transform_kernel, INTERPRET)


def launch_shape(width: int, device: str | None = None) -> tuple[int, int, int, int]:
    """(rows per program, warps, columns per step, pipeline stages) of the transform for a padded rank, as
    data (launch_shapes.json: per GPU name, else its default; the first entry whose rank bound holds the
    width): many small programs (the kernel streams its rows twice, so large blocks leave multiprocessors
    idle), no spills (tests/ops/test_transform_kernel.py); the fastest of benchmarks/transform_shapes.py's
    sweep, which rewrites the table. device: a GPU's name (default: the current one's)."""
    table = _shapes()["transform"]
    entries = table["interpreter"] if INTERPRET else table.get(device or _device_name(), table["default"])
    bound = min((int(b) for b in entries if int(b) >= width), default=max(int(b) for b in entries))
    return tuple(entries[str(bound)])


@functools.cache
def _shapes() -> dict:
    return json.loads((Path(__file__).parent / "launch_shapes.json").read_text(encoding="utf-8"))


@functools.cache
def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "default"


def padded_rank(r: int) -> int:
    """The rank the kernel computes with: a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(r))


def fused_transform(
    a: torch.Tensor,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None = None,
    saved: torch.Tensor | None = None,
    transposed: bool = False,
    launch=None,
    shape: tuple[int, int, int, int] | None = None,
    tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out, projection, grad) for a 2-D a (N, d) and a basis (d, r) in a's dtype, with coefficients g (r,)
    or a band C (2w+1, r):

    out = a + (aB − c) T Bᵀ in a's dtype, T = diag(g), or for a band M (Mᵀ when transposed, the forward
    pass); projection = aB − c as (N, padded_rank(r)) fp32 with zero columns past r (the forward pass
    only: None in the backward pass, whose Q = aB is not kept); grad, the
    coefficients' gradient in their shape, fp32, when saved (a projection of the forward pass, same layout)
    is given: the backward pass (dg = Σ_rows projection ⊙ saved; for a band dC[w+o, j] = Σ_rows
    projection[:, j−o] saved[:, j]). `launch` (grid, arguments, constants, warps, stages) launches the kernel:
    by default the cached launcher (eager calls); library.py passes one that torch.compile can trace.
    `shape`: (rows per program, warps, columns per step, stages), by default launch_shape's (benchmarks
    sweep others). `tokens` > 0: a diagonal per block of that many rows, g (n / tokens, r), grad in its
    shape, each block's sum over its own rows (per program where the programs' rows tile the blocks, else
    each row's products, summed per block afterwards).
    """
    n, d = a.shape
    # the kernel is specialised on the rank and the band: traced with dynamic shapes, int() guards them
    r = int(basis.shape[1])
    if tokens and (coefficients.dim() != 2 or n != len(coefficients) * tokens):
        raise ValueError(
            f"rows: g (blocks, r) for {n} rows in blocks of {tokens}, got {tuple(coefficients.shape)}"
        )
    diagonal = tokens > 0 or coefficients.dim() == 1
    band = 0 if diagonal else int(half_width(coefficients))
    width, block_n, warps, stages, constants = _setup(
        r, band, diagonal, a.dtype, shift is not None, saved is not None, transposed, shape, tokens > 0
    )
    rows = constants["ROWS"]
    if rows and saved is not None and tokens % block_n:  # backward, blocks the programs' rows do not tile
        rows, constants = 2, {**constants, "ROWS": 2}
    a = a if a.stride(-1) == 1 else a.contiguous()
    basis = basis if basis.is_contiguous() else basis.contiguous()
    # the kernel reads C's rows at stride r
    coefficients = coefficients if coefficients.is_contiguous() else coefficients.contiguous()
    out = torch.empty_like(a)
    programs = -(-n // block_n)
    # forward: P is written, the partial sums are not (P stands in for them: an output, not an input); a
    # backward pass over blocks of any length (rows 2) writes each row's products, summed per block below
    if saved is None or rows == 2:
        projection = partial = torch.empty((n, width), device=a.device, dtype=torch.float32)
    else:  # backward: the partial sums are written, Q is not (the partial sums stand in for it)
        # zeros: a band's columns j < o (whose row j − o is outside M) are never written
        empty = torch.empty if diagonal else torch.zeros
        projection = partial = empty((programs, 2 * band + 1, width), device=a.device, dtype=torch.float32)
    arguments = (
        a, basis, coefficients, coefficients if shift is None else shift, out, projection,
        projection if saved is None else saved, partial,
        n, d, r, max(tokens, 1), a.stride(0), out.stride(0), basis.stride(0),
    )  # fmt: skip
    (launch or _launch_transform)((programs,), arguments, constants, warps, stages)
    if saved is None:
        return out, projection, None
    if tokens:  # per program (each in one block) or per row: sum each block's
        return out, None, partial.view(len(coefficients), -1, width).sum(dim=1)[:, :r]
    grad = partial.sum(dim=0)  # (2w+1, width)
    if diagonal:
        return out, None, grad[0] if r == width else grad[0, :r]
    return out, None, grad[:, :r]


@functools.lru_cache(maxsize=256)
def _setup(
    r: int,
    band: int,
    diagonal: bool,
    dtype: torch.dtype,
    shifted: bool,
    backward: bool,
    transposed: bool,
    shape: tuple[int, int, int, int] | None,
    rows: bool = False,
):
    """(padded rank, rows per program, warps, stages, the kernel's constants) of one kind of call, worked out
    once (rows: ROWS 1; a backward pass over blocks its programs do not tile makes it 2)."""
    width = padded_rank(r)
    block_n, warps, columns, stages = shape or launch_shape(width)
    constants = dict(
        HAS_SHIFT=shifted, REDUCE=backward, ROWS=int(rows), PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET, WIDTH=band, MIX=0 if diagonal else (1 if transposed else 2),
        BLOCK_R=width, BLOCK_N=block_n, BLOCK_D=columns,
    )  # fmt: skip
    return width, block_n, warps, stages, constants
