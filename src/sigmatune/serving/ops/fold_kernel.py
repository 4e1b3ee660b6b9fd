"""The mixed-batch expansion after a folded projection (expand_rows): a batch's rows, each on its own
adapter, through up to three layers that read the same input, in one Triton launch with no reduction.

A layer's transform needs every row's projection x Q before it can add the update. Serving folds that
projection into the base GEMM of a group's first layer (serving/folded.py): its weight stored as
[W_0; Q_0ᵀ; Q_1ᵀ; Q_2ᵀ], one cuBLAS GEMM returns h = [x W_0ᵀ + b_0, x Q_0, x Q_1, x Q_2], and this kernel
only expands:

    out_0 = h[:, :e] + ((x Q_0) ⊙ T_0[ids]) P_0ᵀ       the first layer's output (e columns)
    out_m = x        + ((x Q_m) ⊙ T_m[ids]) P_mᵀ       m ≥ 1: the next layers' transformed inputs (d columns)

Program (i, s, m) writes rows block i, column blocks s·LOOP … s·LOOP + LOOP − 1 of out_m: the rows' scaled
projection (BLOCK_N × R), each row's g gathered from its table row inside (so a CUDA graph that replays it
reads whatever the tables hold then), once; then per column block (BLOCK_N × R) · (R × BLOCK_C), fp32
accumulation, one store. The programs are independent: no barrier and no second pass over the columns,
which is what makes a decode step's launch short.
"""

from __future__ import annotations

import torch

from ...ops import switches
from ...ops.transform_kernel import INTERPRET, padded_rank, triton

if triton is not None:
    import triton.language as tl

    # fmt: off
    @triton.jit
    def _expand_member(BASE, stride_base, H, stride_h, offset, P, T, OUT, IDS, N, WIDTH, R, TOKENS, column,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, LOOP: tl.constexpr, EARLY: tl.constexpr):
        """out = base + ((h[:, offset:offset + R]) ⊙ T[IDS[n // TOKENS]]) Pᵀ for this program's rows and
        its LOOP column blocks (WIDTH columns in all): the rows' scaled projection is gathered once.
        EARLY: each column block's base tile is loaded before the gather (the first) or the block before's
        store (the next ones), so that its latency overlaps the gather and the dot; else after the dot."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        pick = row_ok[:, None] & rank_ok[None, :]
        first = column * LOOP * BLOCK_C
        if EARLY:
            starts = first + tl.arange(0, BLOCK_C)
            base = _base_tile(BASE, stride_base, rows, starts, row_ok[:, None] & (starts < WIDTH)[None, :])
        adapter = tl.load(IDS + rows // TOKENS, mask=row_ok, other=0)  # the table row of each row
        g = tl.load(T + adapter[:, None] * R + ranks[None, :], mask=pick, other=0.0)
        p = tl.load(H + rows[:, None] * stride_h + offset + ranks[None, :], mask=pick, other=0.0)
        scaled = (p.to(tl.float32) * g.to(tl.float32)).to(P.dtype.element_ty)  # (BN, BR)
        if UPCAST:  # Triton's interpreter multiplies bf16 wrongly: use fp32 there
            scaled = scaled.to(tl.float32)
        for block in range(LOOP):
            cols = first + block * BLOCK_C + tl.arange(0, BLOCK_C)
            col_ok = cols < WIDTH
            tile = row_ok[:, None] & col_ok[None, :]
            b = tl.load(P + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            if EARLY:  # the next block's (none after the last: its columns masked off)
                ahead = tl.where(block + 1 < LOOP, cols + BLOCK_C, WIDTH)
                upcoming = _base_tile(BASE, stride_base, rows, ahead, row_ok[:, None] & (ahead < WIDTH)[None, :])
            update = tl.dot(scaled, tl.trans(b), input_precision=PRECISION)  # (BN, BC) fp32
            if not EARLY:
                base = _base_tile(BASE, stride_base, rows, cols, tile)
            tl.store(OUT + rows[:, None] * WIDTH + cols[None, :], (base.to(tl.float32) + update).to(base.dtype),
                     mask=tile)
            if EARLY:
                base = upcoming

    @triton.jit
    def _base_tile(BASE, stride_base, rows, cols, mask):
        """The (rows × cols) tile of the base the update is added to (masked: 0)."""
        return tl.load(BASE + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _expand_kernel(
        H, X, IDS, P0, T0, O0, P1, T1, O1, P2, T2, O2,  # pointers
        N, TOKENS, stride_h, stride_x,  # h (N, E_0 + … (the OUTPUTS) + R0 + R1 + R2), x (N, d); TOKENS rows per id
        E0, E1, E2, R0, R1, R2,  # each member's columns (out_m's width) and rank
        MEMBERS: tl.constexpr, OUTPUTS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, LOOP: tl.constexpr,
        EARLY: tl.constexpr,
    ):
        """Program (i, s): rows block i, column program s of the members' column programs one after the
        other (cdiv(E_m, BLOCK_C·LOOP) each: none runs past its member's width). Members m < OUTPUTS add to
        their base output in h (its columns one after the other), the others to x."""
        span = BLOCK_C * LOOP
        column = tl.program_id(1)
        before1 = tl.cdiv(E0, span)  # member 1's first column program
        before2 = before1 + tl.cdiv(E1, span)
        projections = (E0 if OUTPUTS > 0 else 0) + (E1 if OUTPUTS > 1 else 0) + (E2 if OUTPUTS > 2 else 0)
        if column < before1:
            if OUTPUTS > 0:  # (compile-time: one of the two)
                base, stride = H, stride_h
            else:
                base, stride = X, stride_x
            _expand_member(base, stride, H, stride_h, projections, P0, T0, O0, IDS, N, E0, R0, TOKENS, column,
                           PRECISION, UPCAST, BLOCK_N, BLOCK_C, BLOCK_R, LOOP, EARLY)
        if MEMBERS > 1:  # noqa: SIM102  (runtime tests: Triton keeps them apart)
            if column >= before1 and column < before2:
                if OUTPUTS > 1:
                    base, stride = H + E0, stride_h
                else:
                    base, stride = X, stride_x
                _expand_member(base, stride, H, stride_h, projections + R0, P1, T1, O1, IDS, N, E1, R1, TOKENS,
                               column - before1, PRECISION, UPCAST, BLOCK_N, BLOCK_C, BLOCK_R, LOOP, EARLY)
        if MEMBERS > 2:  # noqa: SIM102
            if column >= before2:
                if OUTPUTS > 2:
                    base, stride = H + E0 + E1, stride_h
                else:
                    base, stride = X, stride_x
                _expand_member(base, stride, H, stride_h, projections + R0 + R1, P2, T2, O2, IDS, N, E2, R2,
                               TOKENS, column - before2, PRECISION, UPCAST, BLOCK_N, BLOCK_C, BLOCK_R, LOOP, EARLY)
    # fmt: on


def enabled(disabled: frozenset[str] = frozenset()) -> bool:
    """Whether a bank folds its groups' projections into their base GEMMs (this kernel then expands them)."""
    return switches.enabled("fold", disabled)


def expand_rows(
    h: torch.Tensor,
    x: torch.Tensor,
    expansions: list[torch.Tensor],
    tables: list[torch.Tensor],
    ids: torch.Tensor,
    outputs: int = 1,
    shape: tuple[int, ...] | None = None,
) -> list[torch.Tensor]:
    """[out_m] for up to three layers m reading x (B, …, d), from h (B, …, e_0 + … + e_{o−1} + Σ r_m), the
    folded GEMM of the first o = `outputs` layers [x W_0ᵀ + b_0, …, x W_{o−1}ᵀ + b_{o−1}, x Q_0, x Q_1, …]
    (o = 0: the projections alone), each batch row b on its own adapter ids[b]:

        out_m = y_m + ((x Q_m) ⊙ T_m[ids[b]]) P_mᵀ      (B, …, e_m), m < o: y_m = h's columns of layer m
        out_m = x   + ((x Q_m) ⊙ T_m[ids[b]]) P_mᵀ      (B, …, d),   m ≥ o: the layer's transformed input

    expansions P_m (e_m, r_m) for m < o, then (d, r_m), in x's dtype; tables T_m (capacity, r_m) fp32;
    ids (B,). One launch, forward only. shape: (rows per program, columns per block, column blocks per
    program, warps[, stages[, early: 1 to load the base tiles ahead]]), by default expand_shape's."""
    members = len(expansions)
    if not 1 <= members <= 3 or len(tables) != members or not 0 <= outputs <= members:
        raise ValueError(
            f"expand_rows takes 1 to 3 layers with one table each and 0 to all of them outputs, got {members} "
            f"expansions, {len(tables)} tables, {outputs} outputs"
        )
    if ids.numel() != x.shape[0] or h.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{ids.numel()} adapter rows for h {tuple(h.shape)} and x {tuple(x.shape)}")
    d, widths = x.shape[-1], [p.shape[0] for p in expansions]
    ranks = [p.shape[1] for p in expansions]
    if h.shape[-1] != sum(widths[:outputs]) + sum(ranks) or any(w != d for w in widths[outputs:]):
        raise ValueError(
            f"expansions {[tuple(p.shape) for p in expansions]} ({outputs} outputs) for h {tuple(h.shape)} "
            f"and x {tuple(x.shape)}"
        )
    flat_h, flat_x = (t.reshape(-1, t.shape[-1]) for t in (h, x))
    flat_h, flat_x = (t if t.stride(-1) == 1 else t.contiguous() for t in (flat_h, flat_x))
    n = flat_x.shape[0]
    expansions = [p if p.is_contiguous() else p.contiguous() for p in expansions]
    outs = [flat_x.new_empty(n, w) for w in widths]
    width = padded_rank(max(ranks))
    block_n, block_c, loop, warps, stages, early = complete_shape(
        shape or expand_shape(n, max(widths), width)
    )
    grid = (triton.cdiv(n, block_n), sum(triton.cdiv(w, block_c * loop) for w in widths))  # no idle programs
    member_args = []
    for m in range(3):
        k = min(m, members - 1)  # missing members repeat the last one (never run: MEMBERS masks them)
        member_args += [expansions[k], tables[k], outs[k]]
    padding = [0] * (3 - members)
    _expand_kernel[grid](
        flat_h, flat_x, ids.contiguous(), *member_args,
        n, n // ids.numel(), flat_h.stride(0), flat_x.stride(0), *(widths + padding), *(ranks + padding),
        MEMBERS=members, OUTPUTS=outputs, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=width, LOOP=loop, EARLY=bool(early),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


def complete_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """A shape of 4 to 6 values with the ones left out: 2 stages, base tiles not loaded early."""
    shape = tuple(shape)
    return shape + (2, 0)[len(shape) - 4 :]


def expand_shape(n: int, width: int, rank: int) -> tuple[int, ...]:
    """(rows per program, columns per block, column blocks per program, warps, stages, early) for n rows
    of at most `width` columns at padded rank `rank`. A decode step of up to 64 rows is latency-bound:
    blocks of 16 rows × 64 columns, one a program (many small programs), each base tile loaded before the
    gather (early). Beyond, 64 rows × 128 columns and two blocks a program, so that the rows' gathered g
    and projection (BLOCK_N × r: at r128 as much as the output tile) are read once for 256 columns, the
    base tiles loaded after the dot (ahead, they spill). The fastest of benchmarks/profile_serve.py's
    A/Bs inside a decode step; ptxas for sm_90 spills little from the 64 × 128 tile at r128 and nothing
    elsewhere (tests/serving/test_fold_kernel.py checks ≤ 80 bytes)."""
    if INTERPRET:
        return 16, 16, 2, 4, 2, 0
    block_n, block_c, loop, warps, early = (16, 64, 1, 4, 1) if n <= 64 else (64, 128, 2, 8, 0)
    return block_n, min(block_c, max(16, triton.next_power_of_2(width))), loop, warps, 2, early
