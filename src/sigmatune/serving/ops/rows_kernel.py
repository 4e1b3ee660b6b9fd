"""The mixed-batch forward of the transform (transform_rows): a decode step's rows, each on its own adapter,
in one Triton launch for up to three layers that read the same input.

    out_m = a + ((a B_m − c_m) ⊙ T_m[ids[b]]) B_mᵀ    for the rows of a's leading row b

A decode step counts every launch (a step of a 1.1B model holds 154 adapted layers, a few ms in all): the
layers sharing an input (q, k, v; gate, up) go in one launch, each row's g
is gathered from the adapters' tables inside it (by row id: no gather kernel, and a CUDA graph that
replays it reads whatever the tables hold then), and the programs split the columns as well as the rows
(program (i, s, m): rows block i, columns block s, layer m) so that a few dozen rows still fill the GPU.
Each column block needs its rows' whole projection a B: it computes it alone, or (shared) projects its
own columns and meets the others at a barrier to sum theirs. The tiles are ops/transform_kernel.py's
(project_tile, add_expanded_tile).
"""

from __future__ import annotations

import torch

from ...ops import switches, transform_kernel
from ...ops.transform_kernel import INTERPRET, padded_rank, triton

if triton is not None:  # without Triton (a CPU install) this module only offers the torch path's fallbacks
    import triton.language as tl

    from ...ops.transform_kernel import add_expanded_tile, project_tile  # only where Triton is

    # fmt: off
    @triton.jit
    def _scaled_rows(A, B, T, C, OUT, IDS, PARTIAL, COUNTS, N, D, R, TOKENS, first, stop, stride_a,
                     HAS_SHIFT: tl.constexpr, SYNC: tl.constexpr, ONE_STEP: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, SLOTS: tl.constexpr):
        """One member's tile: out = a + ((a B − c) ⊙ T[IDS[n // TOKENS]]) Bᵀ for this program's rows and
        columns [first, stop). The projection a B is over all D columns: SYNC, the programs of this rows
        block (one per column block, all resident: launch_shape keeps the grid within the GPU) each project
        their own columns, publish the partial sum and wait at a barrier for the others' (ONE_STEP: their
        columns are one step, kept in registers for the output), then sum the partials CHUNK blocks at a
        time (so that a wide rank's do not all sit in registers at once); otherwise each program projects
        all D columns itself."""
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
            projection = project_tile(A, B, rows, row_ok, ranks, rank_ok, first, stop, stride_a, R,
                                  PRECISION, UPCAST, BLOCK_N, BLOCK_R, BLOCK_K)
        else:
            projection = project_tile(A, B, rows, row_ok, ranks, rank_ok, 0, D, stride_a, R,
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
            projection = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for start in tl.static_range(0, BLOCK_S, CHUNK):
                block = start + tl.arange(0, CHUNK)
                everyone = PARTIAL + ((barrier * BLOCK_S + block[:, None, None]) * BLOCK_N + local[None, :, None]) * BLOCK_R
                parts = tl.load(everyone + ranks[None, None, :], mask=(block < blocks)[:, None, None], other=0.0,
                                cache_modifier=".cg")  # (CHUNK, BN, BR), from L2: other programs wrote them
                projection += tl.sum(parts, axis=0)
        if HAS_SHIFT:
            projection -= tl.load(C + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
        scaled = projection * g.to(tl.float32)
        if ONE_STEP:
            update = tl.dot(scaled.to(a.dtype), tl.trans(b), input_precision=PRECISION)  # (BN, BK) fp32
            tl.store(OUT + rows[:, None] * D + cols[None, :], (a.to(tl.float32) + update).to(a.dtype),
                     mask=row_ok[:, None] & col_ok[None, :])
        else:
            add_expanded_tile(A, B, OUT, scaled, rows, row_ok, ranks, rank_ok, first, stop, stride_a, D, R,
                          PRECISION, UPCAST, BLOCK_K)

    @triton.jit
    def _rows_kernel(
        A, IDS, B0, T0, C0, O0, B1, T1, C1, O1, B2, T2, C2, O2, PARTIAL, COUNTS,  # pointers
        N, D, R0, R1, R2, TOKENS, COLUMNS,  # sizes: TOKENS rows of a per id; COLUMNS per program
        stride_a,
        MEMBERS: tl.constexpr, HAS_SHIFT: tl.constexpr, SYNC: tl.constexpr, ONE_STEP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
        SLOTS: tl.constexpr,
    ):
        """A mixed batch through up to three layers that read the same a, forward only: program (i, s, m)
        writes rows block i, columns block s of member m's out_m = a + ((a B_m − c_m) ⊙ T_m[ids]) B_mᵀ."""
        first = tl.program_id(1) * COLUMNS
        stop = tl.minimum(first + COLUMNS, D)
        member = tl.program_id(2)
        if member == 0:
            _scaled_rows(A, B0, T0, C0, O0, IDS, PARTIAL, COUNTS, N, D, R0, TOKENS, first, stop, stride_a,
                         HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K, BLOCK_S,
                         CHUNK, SLOTS)
        if MEMBERS > 1:  # noqa: SIM102  (a constexpr test, then a runtime one: Triton keeps them apart)
            if member == 1:
                _scaled_rows(A, B1, T1, C1, O1, IDS, PARTIAL, COUNTS, N, D, R1, TOKENS, first, stop, stride_a,
                             HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K,
                             BLOCK_S, CHUNK, SLOTS)
        if MEMBERS > 2:  # noqa: SIM102
            if member == 2:
                _scaled_rows(A, B2, T2, C2, O2, IDS, PARTIAL, COUNTS, N, D, R2, TOKENS, first, stop, stride_a,
                             HAS_SHIFT, SYNC, ONE_STEP, PRECISION, UPCAST, BLOCK_R, BLOCK_N, BLOCK_K,
                             BLOCK_S, CHUNK, SLOTS)
    # fmt: on


def serves(a: torch.Tensor, rank: int, disabled: frozenset[str] = frozenset()) -> bool:
    """Whether the kernel serves a mixed batch of a (CUDA) through tables of rank `rank` (≤ MAX_RANK).
    Under TRITON_INTERPRET=1 transform_rows() also runs on CPU tensors, chosen there only inside
    switches.interpreted() (tests)."""
    ready = switches.runs_here(a) and transform_kernel.serves("cuda", a.dtype, rank, 0)
    return ready and switches.enabled("rows", disabled)


def fused_transform_rows(
    a: torch.Tensor,
    bases: list[torch.Tensor],
    tables: list[torch.Tensor],
    ids: torch.Tensor,
    shifts: list[torch.Tensor] | None = None,
    shape: tuple[int, int, int, int, bool] | None = None,
    disabled: frozenset[str] = frozenset(),
) -> list[torch.Tensor]:
    """[out_m] for up to three layers m reading the same a (B, …, d), each row of a batch on its own adapter:

        out_m = a + ((a B_m − c_m) ⊙ T_m[ids[b]]) B_mᵀ    for the rows of a's leading row b

    bases B_m (d, r_m) in a's dtype, tables T_m (capacity, r_m) fp32 (rows gathered inside the kernel, so
    a CUDA graph that replays it reads whatever the tables hold then), ids (B,) integer rows, shifts c_m
    (r_m,) fp32 or None. One launch, forward only. shape: (rows per program, column blocks per layer,
    columns per step, warps, shared), by default launch_shape's. Each column block of a rows block needs
    the rows' whole projection: it computes it alone, or (shared, CUDA only) projects its own columns and
    meets the others at a barrier to sum theirs, which needs the grid on the GPU at once (at most one
    program per multiprocessor, as launch_shape's grids are); not where "shared_projection" is disabled
    (ops/switches.py: the barrier needs the whole grid resident at once, which a GPU split by MPS may not
    allow)."""
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
    processors = 1 if INTERPRET else _processors()
    grid, columns, meta = rows_plan(
        n,
        d,
        members,
        width,
        shape or launch_shape(n, d, members, width, share=switches.enabled("shared_projection", disabled)),
        processors,
    )
    partial, counts = _barriers(flat.device, grid, meta) if meta["SYNC"] else (flat, flat)
    member_args = []
    for m in range(3):
        k = min(m, members - 1)  # missing members repeat the last one (never run: MEMBERS masks them)
        shift = tables[k] if shifts is None else shifts[k]
        member_args += [bases[k], tables[k], shift, outs[k]]
    _rows_kernel[grid](
        flat, ids.contiguous(), *member_args, partial, counts,
        n, d, *(ranks + ranks[-1:] * (3 - members)), n // ids.numel(), columns,
        flat.stride(0),
        HAS_SHIFT=shifts is not None, PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST=INTERPRET,
        **meta,
    )  # fmt: skip
    return [out.view(a.shape) for out in outs]


def rows_plan(n: int, d: int, members: int, width: int, shape, processors: int) -> tuple[tuple, int, dict]:
    """(grid, columns per program, the kernel's launch constants but HAS_SHIFT, PRECISION, UPCAST) of a
    transform_rows launch over n rows of d columns at padded rank `width` in this shape, on a GPU of
    `processors` multiprocessors (a shared grid must fit on it at once)."""
    block_n, split, block_k, warps, shared = shape
    steps = triton.cdiv(d, block_k)
    columns = triton.cdiv(steps, min(split, steps)) * block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, columns), members)
    sync = shared and grid[1] > 1 and not INTERPRET  # interpreted programs run one by one: none could wait
    if sync and (grid[0] * grid[1] * members > processors or grid[0] * members > BARRIERS):
        raise ValueError(f"a grid of {grid} programs does not fit on the GPU at once; use launch_shape's")
    blocks = triton.next_power_of_2(grid[1])
    meta = dict(
        MEMBERS=members,
        SYNC=sync,
        ONE_STEP=sync and columns == block_k,
        BLOCK_R=width,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_S=blocks,
        CHUNK=max(1, min(blocks, PARTS // (block_n * width))),
        SLOTS=BARRIERS,
        num_warps=warps,
        num_stages=3,
    )  # fmt: skip  (CHUNK: the column blocks whose partial sums are added at a time)
    return grid, columns, meta


PARTS = 4096  # fp32 partial-sum values a shared program loads at once (32 registers a thread at 4 warps)
BARRIERS = 512  # barriers (rows block, member) of one launch at most: grids within the GPU need fewer
_COUNTS: dict[torch.device, torch.Tensor] = {}


def _barriers(device: torch.device, grid, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, arrival counts) for a launch whose column blocks meet at a barrier. The counts are
    the device's, int64 (made once, zeros), one per (blocks a barrier waits for, barrier): each only ever
    grows by its `blocks` a launch, so no launch resets them, but launches on one device must not overlap
    (one engine thread on one stream, as the serving engine runs them). meta: rows_plan's constants."""
    if device not in _COUNTS:
        _COUNTS[device] = torch.zeros(17 * BARRIERS, dtype=torch.int64, device=device)
    shape = (grid[0] * grid[2], meta["BLOCK_S"], meta["BLOCK_N"], meta["BLOCK_R"])  # a part per column block
    partial = torch.empty(shape, device=device, dtype=torch.float32)
    return partial, _COUNTS[device]


def launch_shape(
    n: int, d: int, members: int, width: int, processors: int | None = None, share: bool = True
) -> tuple[int, int, int, int, bool]:
    """(rows per program, column blocks per layer, columns per step, warps, shared) for the mixed-batch
    kernel at rank `width` (padded): row blocks of a quarter of the rows (16 to 64), then as many column
    blocks (at most 16) as fit on the GPU at once with one program per multiprocessor: a decode step's
    launch is latency-bound (benchmarks/rows_kernel.py). At a narrow rank the column blocks share the
    projection (each projects its share, one step of 128 columns where the grid allows, then a barrier),
    which served faster than each computing it alone there (benchmarks/serve.py); at r128 each computes it
    alone. Warps and step keep the program's tiles in registers (tests/serving/test_rows_kernel.py compiles
    the shapes decode steps take for sm_90 and checks that ptxas spills nothing): 8 warps for 64-row
    blocks and for 32-row blocks at r128, steps of 64 columns for 64-row blocks from r32 on.
    processors: the GPU's multiprocessors (default: the current device's)."""
    if INTERPRET:
        return 16, 2, 32, 4, False
    block_n = min(64, max(16, triton.next_power_of_2(n) // 4))
    programs = triton.cdiv(n, block_n) * members
    processors = _processors() if processors is None else processors
    split = max(1, min(16, triton.cdiv(d, 128), processors // programs))
    warps = 8 if block_n * max(width, 64) >= 4096 else 4
    step = 64 if block_n >= 64 and width >= 32 else 128
    return block_n, split, step, warps, share and width <= SHARED_RANK


SHARED_RANK = 32  # launch_shape's column blocks share the projection up to this padded rank


def _processors() -> int:
    """Streaming multiprocessors of the current CUDA device (cached)."""
    device = torch.cuda.current_device()
    if device not in _PROCESSORS:
        _PROCESSORS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROCESSORS[device]


_PROCESSORS: dict[int, int] = {}
