"""The mixed-batch kernel alone (core/rows_kernels.transform_rows), as a decode step runs it: back to back in a
CUDA graph, each row of the batch on its own adapter, for the 1.1B Llama shape's inputs (d = 2048).

    python benchmarks/rows_kernel.py [--out results/rows_kernel.json]

Rows: N rows (64, 256, 1024), rank r (16, 128), layers per launch m (1: o or down; 2: gate, up; 3: q, k,
v), the launch shape (rows per program, column blocks, columns per step, warps, shared) — the default
one (rows_kernels.launch_shape), one column block, and other steps, warps and either way of projecting (each
column block alone, or shared: split between them, summed after a barrier) — and the torch ops the
kernel replaces (a gather, two GEMMs, the scaling: per layer), in µs per launch (per m layers, for the
torch ops); and the floor: a one-element add, the least a launch in the graph costs. The time of a graph
of LAUNCHES launches, replayed REPLAYS times after a warm-up, divided by LAUNCHES × REPLAYS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
from results_file import merge_rows

from sigmatune.core import functional as F
from sigmatune.core import rows_kernels

D, ADAPTERS, LAUNCHES, REPLAYS = 2048, 1024, 20, 10
RESULTS = Path(__file__).parent / "results" / "rows_kernel.json"


def key(row: dict) -> tuple:
    """Rows are merged by path, rows, rank, members, shape and device."""
    return row["path"], row["rows"], row["rank"], row["members"], tuple(row["shape"] or ()), row["device"]


def graphed_us(launch) -> float:
    """µs per call of launch() in a CUDA graph of LAUNCHES calls (warmed up first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            launch()
    return replay_ms(graph, REPLAYS) * 1000 / LAUNCHES


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """GPU ms per replay of a captured graph: one untimed replay, then `replays` between CUDA events."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="64,256,1024", help="batch rows N to measure")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    rows = []
    for n in [int(n) for n in args.rows.split(",")]:
        x = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, ADAPTERS, (n,), device="cuda")
        for r in (16, 128):
            bases = [torch.linalg.qr(torch.randn(D, r, device="cuda")).Q.bfloat16() for _ in range(3)]
            tables = [torch.randn(ADAPTERS, r, device="cuda") * 0.05 for _ in range(3)]
            for members in (1, 2, 3):
                chosen = rows_kernels.launch_shape(n, D, members, r)
                block_n, split = chosen[:2]
                shapes = {chosen, (block_n, 1, 128, 4, False)} | {  # split 1: one program projects all d
                    (block_n, split, k, w, shared)
                    for k in (64, 128, 256)
                    for w in (4, 8)
                    for shared in (False, True)
                    if (block_n + r) * k <= 48_000
                }  # fmt: skip (what fits shared memory)
                for shape in sorted(shapes):
                    try:
                        us = graphed_us(
                            lambda x=x, bases=bases[:members], tables=tables[:members], ids=ids, shape=shape: (
                                rows_kernels.transform_rows(x, bases, tables, ids, shape=shape)
                            )
                        )
                    except triton.runtime.errors.OutOfResources:  # too large a tile for shared memory
                        continue
                    rows.append(dict(path="kernel", rows=n, rank=r, members=members, shape=list(shape),
                                     default=shape == chosen, us=round(us, 2), device=device))  # fmt: skip
                us = graphed_us(
                    lambda x=x, bases=bases[:members], tables=tables[:members], ids=ids: [
                        F.transform_rows(x, basis, table.index_select(0, ids))
                        for basis, table in zip(bases, tables, strict=True)
                    ]
                )
                rows.append(dict(path="torch", rows=n, rank=r, members=members, shape=None, default=True,
                                 us=round(us, 2), device=device))  # fmt: skip
                tried = [row for row in rows if row["path"] == "kernel" and (row["rows"], row["rank"],
                         row["members"]) == (n, r, members)]  # fmt: skip
                best = min(tried, key=lambda row: row["us"])
                default = next(row for row in tried if row["default"])
                merge_rows(Path(args.out), rows, key)  # a run cut short keeps what it measured
                print(f"N={n} r={r} m={members}: default {default['shape']} {default['us']} µs, best {best['shape']}"
                      f" {best['us']} µs, torch {rows[-1]['us']} µs", flush=True)  # fmt: skip
    one = torch.zeros(1, device="cuda")
    rows.append(dict(path="floor", rows=1, rank=0, members=0, shape=None, default=True,
                     us=round(graphed_us(lambda: one.add_(1)), 2), device=device))  # fmt: skip
    print(f"floor (a one-element add in the same graph): {rows[-1]['us']} µs")
    merge_rows(Path(args.out), rows, key)


if __name__ == "__main__":
    main()
