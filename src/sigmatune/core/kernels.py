"""Fused Triton kernels: the one-sided transform, used for both the forward and the backward pass, and
(transform_rows) its forward for a mixed-adapter batch, each leading row of a scaled by its own g.

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

transform_rows serves a decode step, where every launch counts (a step of a 1.1B model at batch 64 takes
~4 ms, and it holds 154 adapted layers): up to three layers that read the same input (q, k, v; gate, up)
go in one launch, each row's g is gathered from the adapters' tables inside it (by row id: no gather
kernel), and the programs split the columns as well as the rows (program (i, s, m): rows block i, columns
block s, layer m), each recomputing its rows' projection, so that a few dozen rows still fill the GPU.
"""

from __future__ import annotations

import os

import torch

from .structures import half_width

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the plain torch path is used everywhere
    triton = None

MAX_RANK = 128  # wider bases (e.g. rank="full") use cuBLAS through the plain path
MAX_BAND = 16  # wider bands (one spread over far-apart stored columns) too: the kernel unrolls 2w+1 diagonals
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
ENABLED = os.environ.get("SIGMATUNE_FUSED", "1") != "0"  # SIGMATUNE_FUSED=0: always the GEMM path
IN_COMPILE = os.environ.get("SIGMATUNE_FUSED_COMPILE", "1") != "0"  # =0: torch.compile traces the GEMMs
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(a: torch.Tensor, rank: int, band: int = 0) -> bool:
    """Whether the fused kernel serves this call on CUDA (else the GEMM path does), for r = rank
    directions and a band of half-width `band` (0: a diagonal). Under TRITON_INTERPRET=1 transform()
    also runs on CPU tensors, for tests, but is never chosen."""
    return (
        ENABLED
        and triton is not None
        and a.is_cuda
        and rank <= MAX_RANK
        and band <= MAX_BAND
        and a.dtype in DTYPES
    )


if triton is not None:
    # fmt: off
    @triton.jit
    def _project(A, B, rows, row_ok, ranks, rank_ok, first, D, stride_a, stride_b,
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
    def _add_expanded(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, first, D, stride_a, stride_out, stride_b,
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
        N, D, R,  # sizes
        stride_a, stride_out, stride_b,
        HAS_SHIFT: tl.constexpr, REDUCE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        WIDTH: tl.constexpr, MIX: tl.constexpr,  # band half-width w; MIX 0: ⊙ g, 1: P Mᵀ, 2: P M
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        ranks = tl.arange(0, BLOCK_R)  # (BR,)
        rank_ok = ranks < R
        projection = _project(A, B, rows, row_ok, ranks, rank_ok, 0, D, stride_a, stride_b,
                              PRECISION, UPCAST, BLOCK_N, BLOCK_R, BLOCK_D)
        if HAS_SHIFT:
            projection -= tl.load(C + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
        keep = row_ok[:, None]  # all BLOCK_R columns: those past R hold zeros
        tl.store(PROJ + rows[:, None] * BLOCK_R + ranks[None, :], projection, mask=keep)
        if REDUCE:  # partial gradient for these rows, diagonal t = w + o: Σ_rows Q[:, j − o] P_saved[:, j]
            for t in tl.static_range(0, 2 * WIDTH + 1):  # by k = j − o: Σ_rows Q[:, k] P_saved[:, k + o] at j = k + o
                column = ranks + (t - WIDTH)  # j = k + o
                inside = (column >= 0) & (column < R) & rank_ok
                saved = tl.load(SAVED + rows[:, None] * BLOCK_R + column[None, :], mask=keep & inside[None, :], other=0.0)
                tl.store(PARTIAL + (pid * (2 * WIDTH + 1) + t) * BLOCK_R + column, tl.sum(projection * saved, axis=0), mask=inside)
        if MIX == 0:
            g = tl.load(G + ranks, mask=rank_ok, other=0.0).to(tl.float32)
            scaled = projection * g[None, :]  # (BN, BR) fp32
        else:  # the tile T[k, i] of Mᵀ (MIX 1: M[i, k]) or M (MIX 2: M[k, i]), gathered from C
            k, i = ranks[:, None], ranks[None, :]
            offset = k - i if MIX == 1 else i - k  # o of the entry, with column j = k (MIX 1) or i (MIX 2)
            column = k if MIX == 1 else i
            inside = (offset >= -WIDTH) & (offset <= WIDTH) & (k < R) & (i < R)
            mix = tl.load(G + (WIDTH + offset) * R + column, mask=inside, other=0.0).to(tl.float32)
            scaled = tl.dot(projection, mix, input_precision=PRECISION)  # (BN, BR) fp32
        _add_expanded(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, 0, D, stride_a, stride_out, stride_b,
                      PRECISION, UPCAST, BLOCK_D)

    @triton.jit
    def _scaled_rows(A, B, T, C, OUT, IDS, PARTIAL, COUNTS, N, D, R, TOKENS, first, stop, stride_a,
                     HAS_SHIFT: tl.constexpr, SYNC: tl.constexpr, ONE_STEP: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, SLOTS: tl.constexpr):
        """One member's tile: out = a + ((a B − c) ⊙ T[IDS[n // TOKENS]]) Bᵀ for this program's rows and
        columns [first, stop). The projection a B is over all D columns: SYNC, the programs of this rows
        block (one per column block, all resident: launch_shape keeps the grid within the GPU) each project
        their own columns, publish the partial sum and wait at a barrier for the others' (ONE_STEP: their
        columns are one step, kept in registers for the output); otherwise each program projects all D
        columns itself."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        # the rows' g first: two dependent loads whose latency the projection then hides
        adapter = tl.load(IDS + rows // TOKENS, mask=row_ok, other=0)  # the table row of each row of a
        g = tl.load(T + adapter[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        if ONE_STEP:
            cols = first + tl.arange(0, BLOCK_K)
            col_ok = cols < stop
            b = tl.load(B + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            b = b.to(a.dtype)
            projection = tl.dot(a, b, input_precision=PRECISION)  # SYNC only: never interpreted (UPCAST)
        elif SYNC:
            projection = _project(A, B, rows, row_ok, ranks, rank_ok, first, stop, stride_a, R,
                                  PRECISION, UPCAST, BLOCK_N, BLOCK_R, BLOCK_K)
        else:
            projection = _project(A, B, rows, row_ok, ranks, rank_ok, 0, D, stride_a, R,
                                  PRECISION, UPCAST, BLOCK_N, BLOCK_R, BLOCK_K)
        if SYNC:  # publish this block's part, wait for the others', sum them
            blocks = tl.num_programs(1)
            barrier = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)  # (member, rows block)
            local = tl.arange(0, BLOCK_N)
            mine = PARTIAL + (barrier * BLOCK_S + tl.program_id(1)) * BLOCK_N * BLOCK_R
            tl.store(mine + local[:, None] * BLOCK_R + ranks[None, :], projection)
            tl.debug_barrier()  # every thread's part stored before the program arrives
            # a counter per (blocks, barrier) only ever grows by `blocks` a launch: this launch's round
            # ends at the next multiple of blocks after the count this program found
            counter = COUNTS + blocks * SLOTS + barrier
            found = tl.atomic_add(counter, 1)
            end = (found // blocks + 1) * blocks
            seen = found + 1
            while seen < end:
                seen = tl.atomic_add(counter, 0)
            tl.debug_barrier()
            block = tl.arange(0, BLOCK_S)
            everyone = PARTIAL + ((barrier * BLOCK_S + block[:, None, None]) * BLOCK_N + local[None, :, None]) * BLOCK_R
            parts = tl.load(everyone + ranks[None, None, :], mask=(block < blocks)[:, None, None], other=0.0,
                            cache_modifier=".cg")  # (BS, BN, BR), from L2: other programs wrote them
            projection = tl.sum(parts, axis=0)
        if HAS_SHIFT:
            projection -= tl.load(C + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
        scaled = projection * g.to(tl.float32)
        if ONE_STEP:
            update = tl.dot(scaled.to(a.dtype), tl.trans(b), input_precision=PRECISION)  # (BN, BK) fp32
            tl.store(OUT + rows[:, None] * D + cols[None, :], (a.to(tl.float32) + update).to(a.dtype),
                     mask=row_ok[:, None] & col_ok[None, :])
        else:
            _add_expanded(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, first, stop, stride_a, D, R,
                          PRECISION, UPCAST, BLOCK_K)

    @triton.jit
    def _rows_kernel(
        A, IDS, B0, T0, C0, O0, B1, T1, C1, O1, B2, T2, C2, O2, PARTIAL, COUNTS,  # pointers
        N, D, R0, R1, R2, TOKENS, COLUMNS,  # sizes: TOKENS rows of a per id; COLUMNS per program
        stride_a,
        MEMBERS: tl.constexpr, HAS_SHIFT: tl.constexpr, SYNC: tl.constexpr, ONE_STEP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, SLOTS: tl.constexpr,
    ):
        """A mixed batch through up to three layers that read the same a, forward only: program (i, s, m)
        writes rows block i, columns block s of member m's out_m = a + ((a B_m − c_m) ⊙ T_m[ids]) B_mᵀ."""
        first = tl.program_id(1) * COLUMNS
        stop = tl.minimum(first + COLUMNS, D)
        member = tl.program_id(2)
        if member == 0:
            _scaled_rows(A, B0, T0, C0, O0, IDS, PARTIAL, COUNTS, N, D, R0, TOKENS, first, stop, stride_a,
                         HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K, BLOCK_S,
                         SLOTS)
        if MEMBERS > 1:  # noqa: SIM102  (a constexpr test, then a runtime one: Triton keeps them apart)
            if member == 1:
                _scaled_rows(A, B1, T1, C1, O1, IDS, PARTIAL, COUNTS, N, D, R1, TOKENS, first, stop, stride_a,
                             HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K,
                             BLOCK_S, SLOTS)
        if MEMBERS > 2:  # noqa: SIM102
            if member == 2:
                _scaled_rows(A, B2, T2, C2, O2, IDS, PARTIAL, COUNTS, N, D, R2, TOKENS, first, stop, stride_a,
                             HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K,
                             BLOCK_S, SLOTS)
    # fmt: on


def padded_rank(r: int) -> int:
    """The rank the kernel computes with: a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(r))


def transform(
    a: torch.Tensor,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None = None,
    saved: torch.Tensor | None = None,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, projection, grad) for a 2-D a (N, d) and a basis (d, r) in a's dtype, with coefficients g (r,)
    or a band C (2w+1, r):

    out = a + (aB − c) T Bᵀ in a's dtype, T = diag(g), or for a band M (Mᵀ when transposed, the forward
    pass); projection = aB − c as (N, padded_rank(r)) fp32 with zero columns past r; grad, the
    coefficients' gradient in their shape, fp32, when saved (a projection of the forward pass, same layout)
    is given: the backward pass (dg = Σ_rows projection ⊙ saved; for a band dC[w+o, j] = Σ_rows
    projection[:, j−o] saved[:, j]).
    """
    n, d = a.shape
    r = basis.shape[1]
    width = padded_rank(r)
    band = half_width(coefficients)
    block_n = 16 if INTERPRET else (64 if width <= 32 else 32)  # rows per program: ~N/32 programs
    a = a if a.stride(-1) == 1 else a.contiguous()
    basis = basis if basis.is_contiguous() else basis.contiguous()
    coefficients = coefficients.contiguous()  # the kernel reads C's rows at stride r
    out = torch.empty_like(a)
    projection = torch.empty((n, width), device=a.device, dtype=torch.float32)
    programs = triton.cdiv(n, block_n)
    diagonals = 2 * band + 1
    partial = coefficients
    if saved is not None:  # zeros: a band's columns j < o (whose row j − o is outside M) are never written
        empty = torch.empty if band == 0 else torch.zeros
        partial = empty((programs, diagonals, width), device=a.device, dtype=torch.float32)
    _transform_kernel[(programs,)](
        a, basis, coefficients, coefficients if shift is None else shift, out, projection,
        projection if saved is None else saved, partial,
        n, d, r,
        a.stride(0), out.stride(0), basis.stride(0),
        HAS_SHIFT=shift is not None, REDUCE=saved is not None, BLOCK_R=width,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST=INTERPRET,
        WIDTH=band, MIX=0 if coefficients.dim() == 1 else (1 if transposed else 2),
        BLOCK_N=block_n, BLOCK_D=32 if INTERPRET else 128, num_warps=4, num_stages=3,
    )  # fmt: skip
    if saved is None:
        return out, projection, None
    grad = partial.sum(dim=0)[:, :r]  # (2w+1, r)
    return out, projection, grad[0] if coefficients.dim() == 1 else grad


def transform_rows(
    a: torch.Tensor,
    bases: list[torch.Tensor],
    tables: list[torch.Tensor],
    ids: torch.Tensor,
    shifts: list[torch.Tensor] | None = None,
    shape: tuple[int, int, int, int, bool] | None = None,
) -> list[torch.Tensor]:
    """[out_m] for up to three layers m reading the same a (B, …, d), each row of a batch on its own adapter:

        out_m = a + ((a B_m − c_m) ⊙ T_m[ids[b]]) B_mᵀ    for the rows of a's leading row b

    bases B_m (d, r_m) in a's dtype, tables T_m (capacity, r_m) fp32 (rows gathered inside the kernel, so
    a CUDA graph that replays it reads whatever the tables hold then), ids (B,) integer rows, shifts c_m
    (r_m,) fp32 or None. One launch, forward only. shape: (rows per program, column blocks per layer,
    columns per step, warps, shared), by default launch_shape's. Each column block of a rows block needs
    the rows' whole projection: it computes it alone, or (shared, CUDA only) projects its own columns and
    meets the others at a barrier to sum theirs, which needs the grid on the GPU at once (at most one
    program per multiprocessor, as launch_shape's grids are)."""
    members = len(bases)
    if not 1 <= members <= 3 or len(tables) != members or (shifts is not None and len(shifts) != members):
        raise ValueError(f"transform_rows takes 1 to 3 layers with one table each, got {members} bases")
    if ids.numel() != a.shape[0]:
        raise ValueError(f"{ids.numel()} adapter rows for a batch of {a.shape[0]}")
    d = a.shape[-1]
    flat = a.reshape(-1, d)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    n = flat.shape[0]
    bases = [b if b.is_contiguous() else b.contiguous() for b in bases]
    ranks = [b.shape[1] for b in bases]
    outs = [torch.empty_like(flat) for _ in bases]
    width = padded_rank(max(ranks))
    block_n, split, block_k, warps, shared = shape or launch_shape(n, d, members, width)
    steps = triton.cdiv(d, block_k)
    columns = triton.cdiv(steps, min(split, steps)) * block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, columns), members)
    sync = shared and grid[1] > 1 and not INTERPRET  # interpreted programs run one by one: none could wait
    if sync and (grid[0] * grid[1] * members > _processors() or grid[0] * members > BARRIERS):
        raise ValueError(f"a grid of {grid} programs does not fit on the GPU at once; use launch_shape's")
    partial, counts = _barriers(flat.device, grid, block_n, width) if sync else (flat, flat)
    member_args = []
    for m in range(3):
        k = min(m, members - 1)  # missing members repeat the last one (never run: MEMBERS masks them)
        shift = tables[k] if shifts is None else shifts[k]
        member_args += [bases[k], tables[k], shift, outs[k]]
    _rows_kernel[grid](
        flat, ids.contiguous(), *member_args, partial, counts,
        n, d, *(ranks + ranks[-1:] * (3 - members)), n // ids.numel(), columns,
        flat.stride(0),
        MEMBERS=members, HAS_SHIFT=shifts is not None, SYNC=sync, ONE_STEP=sync and columns == block_k,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST=INTERPRET,
        BLOCK_R=width, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_S=triton.next_power_of_2(grid[1]),
        SLOTS=BARRIERS, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return [out.view(a.shape) for out in outs]


BARRIERS = 512  # barriers (rows block, member) of one launch at most: grids within the GPU need fewer
_COUNTS: dict[torch.device, torch.Tensor] = {}


def _barriers(device: torch.device, grid, block_n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, arrival counts) for a launch whose column blocks meet at a barrier. The counts are
    the device's, int64 (made once, zeros), one per (blocks a barrier waits for, barrier): each only ever
    grows by its `blocks` a launch, so no launch resets them, but launches on one device must not overlap
    (one engine thread on one stream, as the serving engine runs them)."""
    if device not in _COUNTS:
        _COUNTS[device] = torch.zeros(17 * BARRIERS, dtype=torch.int64, device=device)
    blocks = triton.next_power_of_2(grid[1])
    partial = torch.empty((grid[0] * grid[2], blocks, block_n, width), device=device, dtype=torch.float32)
    return partial, _COUNTS[device]


def launch_shape(n: int, d: int, members: int, width: int) -> tuple[int, int, int, int, bool]:
    """(rows per program, column blocks per layer, columns per step, warps, shared) for the mixed-batch
    kernel at rank `width` (padded): row blocks of a quarter of the rows (16 to 64), then as many column
    blocks (at most 16) as fit on the GPU at once with one program per multiprocessor. A decode step's
    launch is latency-bound on an H200 (benchmarks/rows_kernel.py: 7–13 µs at 64 rows, r16, against a
    1.2 µs floor). At a narrow rank the column blocks share the projection (each projects its share, one
    step of 128 columns where the grid allows, then a barrier); at r128 each computes it alone. Decoding
    through an r16 bank at batch 64, every row its own adapter, one process on the H200: 0.929× the base
    shared against 0.854× alone; r128 (the barrier's first version, which read and reset its counters):
    0.728× shared against 0.789× alone at batch 64, 0.779× against 0.914× at 1,024."""
    if INTERPRET:
        return 16, 2, 32, 4, False
    block_n = min(64, max(16, triton.next_power_of_2(n) // 4))
    programs = triton.cdiv(n, block_n) * members
    split = max(1, min(16, triton.cdiv(d, 128), _processors() // programs))
    return block_n, split, 128, 4, width <= SHARED_RANK


# launch_shape's column blocks share the projection up to this padded rank; SIGMATUNE_SHARED_PROJECTION=0
# turns it off (its barrier needs the whole grid resident at once, which a GPU split by MPS may not allow)
SHARED_RANK = 32 if os.environ.get("SIGMATUNE_SHARED_PROJECTION", "1") != "0" else 0


def _processors() -> int:
    """Streaming multiprocessors of the current CUDA device (cached)."""
    device = torch.cuda.current_device()
    if device not in _PROCESSORS:
        _PROCESSORS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROCESSORS[device]


_PROCESSORS: dict[int, int] = {}
