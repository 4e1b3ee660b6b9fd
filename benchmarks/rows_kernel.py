"""What does the mixed-batch kernel alone (serving/ops/rows_kernel.fused_transform_rows) cost per launch, in each launch shape,
as a decode step runs it: back to back in a CUDA graph, each row of the batch on its own adapter?

    python benchmarks/rows_kernel.py [--rows 64,256,1024] [--d 2048] [--ranks 16,128] [--out results/rows_kernel.json]

Rows: N rows (64, 256, 1024) of the 1.1B Llama shape's inputs (d = 2048), rank r (16, 128), layers per launch
m (1: o or down; 2: gate, up; 3: q, k, v), the launch shape (rows per program, column blocks, columns per step,
warps, shared) — the default one (rows_kernel.launch_shape), one column block, and other steps, warps and
either way of projecting (each column block alone, or shared: split between them, summed after a barrier;
--shapes default: the default only) — and the torch ops the kernel replaces (a gather, two GEMMs, the scaling:
per layer), in µs per launch (per m layers, for the torch ops); and the floor: a one-element add, the least a
launch in the graph costs. The time of a graph of --launches launches, replayed --replays times after a
warm-up, divided by launches × replays (on a CPU, which has no graphs: wall time per call, the kernel in
Triton's interpreter).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import common
import torch
import triton

ADAPTERS = 1024


def internals() -> SimpleNamespace:
    """The sigmatune internals this script times, in one place."""
    from sigmatune.core.transform import DIAGONAL, GEMMS
    from sigmatune.serving.ops import rows_kernel

    return SimpleNamespace(
        kernel=rows_kernel.fused_transform_rows,  # (a, bases, tables, ids, shape=...) → [out per layer]
        launch_shape=rows_kernel.launch_shape,  # (n, d, members, width) → the default shape
        # (a (N, d), basis, g per row) → out: the torch ops (transform_rows takes the training kernel on CUDA)
        torch_rows=lambda a, basis, g: GEMMS.forward_pass(a, basis, g, None, DIAGONAL, rows=True)[0],
    )


def key(row: dict) -> tuple:
    """Rows are merged by path, rows, rank, members, shape and device."""
    return row["path"], row["rows"], row["rank"], row["members"], tuple(row["shape"] or ()), row["device"]


def per_launch_us(launch, device: torch.device, launches: int, replays: int) -> float:
    """µs per call of launch() in a CUDA graph of `launches` calls (warmed up first); on a CPU, wall time."""
    if device.type != "cuda":
        launch()
        start = time.perf_counter()
        for _ in range(launches):
            launch()
        return 1e6 * (time.perf_counter() - start) / launches
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            launch()
    return common.replay_ms(graph, replays) * 1000 / launches


def shapes_to_try(chosen: tuple, rank: int, which: str) -> list[tuple]:
    """The default shape, and (which = all) one column block and every other step, warps and way of
    projecting that fits shared memory."""
    if which == "default":
        return [chosen]
    block_n, split = chosen[:2]
    shapes = {chosen, (block_n, 1, 128, 4, False)} | {  # split 1: one program projects all d
        (block_n, split, k, w, shared)
        for k in (64, 128, 256)
        for w in (4, 8)
        for shared in (False, True)
        if (block_n + rank) * k <= 48_000
    }  # fmt: skip
    return sorted(shapes)


def timed_launches(ops, x, ids, bases, tables, shapes: list[tuple], timing: dict) -> dict:
    """{shape: µs per launch} of the kernel over these layers for each shape that fits (None: the torch ops,
    per the same layers)."""
    times = {}
    for shape in shapes:
        try:
            times[shape] = per_launch_us(
                lambda shape=shape: ops.kernel(x, bases, tables, ids, shape=shape), **timing
            )
        except triton.runtime.errors.OutOfResources:  # too large a tile for shared memory
            continue

    def torch_ops():
        return [ops.torch_rows(x, b, t.index_select(0, ids)) for b, t in zip(bases, tables, strict=True)]

    times[None] = per_launch_us(torch_ops, **timing)
    return times


def main() -> None:
    options = common.parser(__doc__, out="rows_kernel.json")
    options.add_argument("--rows", default="64,256,1024", help="batch rows N to measure")
    options.add_argument("--d", type=int, default=2048)
    options.add_argument("--ranks", default="16,128")
    options.add_argument("--members", default="1,2,3", help="layers per launch")
    options.add_argument("--shapes", choices=["all", "default"], default="all")
    options.add_argument("--launches", type=int, default=20)
    options.add_argument("--replays", type=int, default=10)
    args = options.parse_args()
    ops = internals()
    device = common.pick_device(args.device)
    name = common.device_name(device)
    timing = dict(device=device, launches=args.launches, replays=args.replays)
    rows = []
    for n in common.ints(args.rows):
        x = torch.randn(n, args.d, device=device, dtype=torch.bfloat16)
        ids = torch.randint(0, ADAPTERS, (n,), device=device)
        for r in common.ints(args.ranks):
            bases = [torch.linalg.qr(torch.randn(args.d, r, device=device)).Q.bfloat16() for _ in range(3)]
            tables = [torch.randn(ADAPTERS, r, device=device) * 0.05 for _ in range(3)]
            for members in common.ints(args.members):
                chosen = ops.launch_shape(n, args.d, members, r)
                shapes = shapes_to_try(chosen, r, args.shapes)
                times = timed_launches(ops, x, ids, bases[:members], tables[:members], shapes, timing)
                for shape, us in times.items():
                    rows.append(dict(path="torch" if shape is None else "kernel", rows=n, rank=r, members=members,
                                     shape=shape and list(shape), default=shape in (chosen, None), us=round(us, 2),
                                     device=name))  # fmt: skip
                common.merge_rows(args.out, rows, key)  # a run cut short keeps what it measured
                best = min((s for s in times if s is not None), key=times.get)
                print(f"N={n} r={r} m={members}: default {list(chosen)} {times[chosen]:.2f} µs, best {list(best)}"
                      f" {times[best]:.2f} µs, torch {times[None]:.2f} µs", flush=True)  # fmt: skip
    one = torch.zeros(1, device=device)
    rows.append(dict(path="floor", rows=1, rank=0, members=0, shape=None, default=True,
                     us=round(per_launch_us(lambda: one.add_(1), **timing), 2), device=name))  # fmt: skip
    print(f"floor (a one-element add in the same graph): {rows[-1]['us']} µs")
    common.merge_rows(args.out, rows, key)


if __name__ == "__main__":
    main()
