"""The training transform's forward pass as two kernels, against the fused kernel and cuBLAS (GPU µs).

    python benchmarks/transform_split.py [--n 4096] [--d 2048] [--ranks 16,64] [--out results/transform_split.json]

    out = a + ((a B) ⊙ g) Bᵀ,   a (N, d) bf16, B (d, r)

Why: a graphed or compiled step at r ≤ 64 is bound by the fused kernel's GPU time (kernels.py: 18 µs forward
at r = 16, 27.5 at r = 64, for N = 4,096, d = 2,048, where reading a and writing out is ~32 MB, ~8 µs at the
H200's bandwidth). One fused program owns a few rows (16–32, so that 4,096 rows fill 132 multiprocessors) and
reads all of B (d × r: 64 KB at r = 16, 256 KB at r = 64) twice, once per pass: for r = 64 that is twice
as many bytes of B as of a, from L2. Split in two, each kernel tiles for reuse:

    project   P_s = a[:, D_s] B[D_s]       programs (row block, column split s); partial sums, fp32
    expand    out = a + ((Σ_s P_s) ⊙ g) Bᵀ  programs (row block, column block); row blocks of column block 0
                                             also write P (the forward pass saves it)

B is read once per row block of 32–128 rows (project) and a tile of Bᵀ per output tile (expand); a is read
twice from HBM instead of once plus once from L2. For each rank this sweeps the shapes of both kernels
(project: rows, splits, columns, warps; expand: rows, columns, warps), checks each against the fused kernel,
and reports the best pair beside the fused kernel, cuBLAS's `a @ B` and `addmm(a, P, Bᵀ)`, and a copy of a
(the bandwidth floor). If the split wins by a margin, the backward (dx = dy + ((dy B) ⊙ g) Bᵀ and
dg = Σ_rows (dy B) ⊙ P, the latter in expand's column-block-0 programs) follows the same plan in kernels.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from layer_overhead import timed
from results_file import write_json
from transform_shapes import shape_parser

from sigmatune.core import kernels
from sigmatune.core.kernels import triton

if triton is not None:
    import triton.language as tl

    # fmt: off
    @triton.jit
    def _rows_and_ranks(N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's rows (by its first grid index) and the padded ranks, with their masks."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        return rows, rows < N, ranks, ranks < R

    @triton.jit
    def _project_split(A, B, PARTIAL, N, D, R, stride_a, stride_b, chunk,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """PARTIAL[s, rows] = a[rows, chunk s] B[chunk s] (BN, BR) fp32."""
        rows, row_ok, ranks, rank_ok = _rows_and_ranks(N, R, BLOCK_N, BLOCK_R)
        split = tl.program_id(1)
        total = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for start in range(split * chunk, split * chunk + chunk, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(B + cols[:, None] * stride_b + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            total = tl.dot(a, b, total)
        tl.store(PARTIAL + (split * N + rows[:, None]) * BLOCK_R + ranks[None, :], total, mask=row_ok[:, None])

    @triton.jit
    def _expand(A, B, G, PARTIAL, OUT, PROJ, N, D, R, stride_a, stride_out, stride_b,
                SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[rows, cols] = a + ((Σ_s PARTIAL[s, rows]) ⊙ g) Bᵀ[:, cols]; column block 0 writes P."""
        rows, row_ok, ranks, rank_ok = _rows_and_ranks(N, R, BLOCK_N, BLOCK_R)
        block = tl.program_id(1)
        projection = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for split in tl.static_range(0, SPLITS):
            projection += tl.load(PARTIAL + (split * N + rows[:, None]) * BLOCK_R + ranks[None, :],
                                  mask=row_ok[:, None], other=0.0)
        if block == 0:
            tl.store(PROJ + rows[:, None] * BLOCK_R + ranks[None, :], projection, mask=row_ok[:, None])
        g = tl.load(G + ranks, mask=rank_ok, other=0.0).to(tl.float32)
        scaled = (projection * g[None, :]).to(A.dtype.element_ty)
        cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        tile = row_ok[:, None] & col_ok[None, :]
        bt = tl.load(B + cols[None, :] * stride_b + ranks[:, None], mask=col_ok[None, :] & rank_ok[:, None], other=0.0)
        a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=tile, other=0.0)
        update = tl.dot(scaled, bt.to(A.dtype.element_ty))
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :], (a.to(tl.float32) + update).to(a.dtype), mask=tile)
    # fmt: on

PROJECT = dict(rows=(32, 64, 128), splits=(1, 2, 4), columns=(64, 128), warps=(4, 8))
EXPAND = dict(rows=(32, 64, 128), columns=(64, 128, 256), warps=(4, 8))
RESULTS = Path(__file__).parent / "results" / "transform_split.json"


def project(a, basis, rows: int, splits: int, columns: int, warps: int) -> torch.Tensor:
    """The partial projections (splits, N, padded r) fp32."""
    n, d = a.shape
    r = basis.shape[1]
    width = kernels.padded_rank(r)
    chunk = triton.cdiv(triton.cdiv(d, splits), columns) * columns  # a whole number of column steps
    partial = torch.empty((splits, n, width), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(n, rows), splits)
    _project_split[grid](
        a, basis, partial, n, d, r, a.stride(0), basis.stride(0), chunk,
        BLOCK_N=rows, BLOCK_R=width, BLOCK_D=columns, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return partial


def expand(a, basis, g, partial, rows: int, columns: int, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, P) from the partial projections."""
    n, d = a.shape
    out = torch.empty_like(a)
    projection = torch.empty(partial.shape[1:], device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(n, rows), triton.cdiv(d, columns))
    _expand[grid](
        a, basis, g, partial, out, projection, n, d, basis.shape[1], a.stride(0), out.stride(0), basis.stride(0),
        SPLITS=partial.shape[0], BLOCK_N=rows, BLOCK_R=partial.shape[2], BLOCK_D=columns, num_warps=warps,
        num_stages=2,
    )  # fmt: skip
    return out, projection


def sweep(kind: str, grid: dict, run, check, calls: int) -> list[dict]:
    """One row per shape of `grid` that runs and passes `check`: its GPU µs per call."""
    rows = []
    for values in itertools.product(*grid.values()):
        shape = dict(zip(grid, values, strict=True))
        try:
            check(run(**shape))
            gpu_us = timed(lambda shape=shape: run(**shape), calls, repeats=3)[1]
        except Exception as err:  # e.g. Triton's OutOfResources: the shape needs more shared memory
            print(f"  {kind} {shape}: FAILED {type(err).__name__}: {str(err)[:160]}", flush=True)
            continue
        rows.append(dict(kind=kind, **shape, gpu_us=round(gpu_us, 2)))
    return rows


def measure_rank(a, r: int, calls: int) -> list[dict]:
    """Every row for one rank: the references, then both sweeps (expand after the fastest project of each
    split count)."""
    generator = torch.Generator().manual_seed(r)
    basis = torch.linalg.qr(torch.randn(a.shape[1], r, generator=generator))[0]
    basis = basis.to(a.device, a.dtype).contiguous()  # (d, r), rows at stride r as the kernels read them
    g = (0.1 * torch.randn(r, generator=generator)).to(a.device)
    out, saved, _ = kernels.transform(a, basis, g, transposed=True)
    scaled = (a @ basis) * g.to(a.dtype)
    rows = [
        dict(
            kind="fused", gpu_us=timed(lambda: kernels.transform(a, basis, g, transposed=True), calls, 3)[1]
        ),
        dict(kind="cublas a @ B", gpu_us=timed(lambda: a @ basis, calls, 3)[1]),
        dict(kind="cublas addmm", gpu_us=timed(lambda: torch.addmm(a, scaled, basis.T), calls, 3)[1]),
    ]

    def close(got, expected):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=5e-2)

    projects = sweep(
        "project", PROJECT, lambda **s: project(a, basis, **s), lambda p: close(p.sum(0), saved), calls
    )
    rows += projects
    for splits in PROJECT["splits"]:
        mine = [row for row in projects if row["splits"] == splits]
        if not mine:
            continue
        best = min(mine, key=lambda row: row["gpu_us"])
        partial = project(a, basis, **{k: best[k] for k in PROJECT})
        expands = sweep(
            "expand", EXPAND, lambda partial=partial, **s: expand(a, basis, g, partial, **s),
            lambda result: (close(result[0], out), close(result[1], saved)), calls,
        )  # fmt: skip
        rows += [dict(row, splits=splits) for row in expands]
    return [dict(row, rank=r) for row in rows]


def summary(rows: list[dict]) -> None:
    """The fastest project + expand pair per rank and split count, beside the references."""
    for r in sorted({row["rank"] for row in rows}):
        mine = [row for row in rows if row["rank"] == r]
        named = {row["kind"]: row["gpu_us"] for row in mine if row["kind"] not in ("project", "expand")}
        print(f"r={r}: " + ", ".join(f"{kind} {us:.1f} µs" for kind, us in named.items()))
        for splits in PROJECT["splits"]:
            best = {
                kind: min((row for row in mine if row["kind"] == kind and row["splits"] == splits),
                          key=lambda row: row["gpu_us"], default=None)
                for kind in ("project", "expand")
            }  # fmt: skip
            if None in best.values():
                continue
            total = best["project"]["gpu_us"] + best["expand"]["gpu_us"]
            shapes = {
                kind: {k: v for k, v in row.items() if k in PROJECT or k in EXPAND}
                for kind, row in best.items()
            }
            print(
                f"  splits {splits}: {total:.1f} µs = project {shapes['project']} + expand {shapes['expand']}"
            )


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("transform_split.py times GPU kernels: run it on a CUDA machine with Triton")
    a = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    rows = [dict(kind="copy of a", rank=None, gpu_us=timed(lambda: a.clone(), args.calls, 3)[1])]
    print(f"copy of a (read + write N × d): {rows[0]['gpu_us']:.1f} µs", flush=True)
    for r in (int(v) for v in args.ranks.split(",")):
        rows += measure_rank(a, r, args.calls)
    summary([row for row in rows if row["rank"] is not None])
    facts = dict(n=args.n, d=args.d, device=torch.cuda.get_device_name(), torch=torch.__version__)
    write_json(args.out, dict(facts=facts, rows=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
