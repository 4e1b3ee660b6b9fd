"""Which launch shape of the training transform's kernel (transform_kernel.fused_transform, forward and backward) is fastest?

    python benchmarks/transform_shapes.py [--n 4096] [--d 2048] [--ranks 16,64] [--grid 16,32/4/64/3]
        [--out results/transform_shapes.json] [--write-shapes]

A compiled or graphed training step is bound by the GPU: the transform's share of it is one forward and one
backward launch per adapted layer (at the 1.1B Llama shape, d = 2,048 for 5 of the 7 layer types). For each
padded rank this times every shape in the grid — rows per program, warps, columns per step, pipeline
stages — as kernels.launch_shape would return it, the calls queued behind a GPU sleep and run back to back
(common.host_and_gpu_us), bf16 activations, a diagonal g. The row `chosen` marks launch_shape's own answer,
whose results every other shape must reproduce (else the shape is reported as failed); the summary lists
the fastest shapes by forward + backward µs. (On a CPU the kernel runs in Triton's interpreter, whose
launch shape is fixed: that checks the script, not the shapes.) --write-shapes puts each rank's fastest shape
into the kernel's table (src/sigmatune/ops/launch_shapes.json) under this GPU's name.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import common
import torch

ROWS, WARPS, COLUMNS, STAGES = (16, 32, 64), (4, 8), (64, 128, 256), (2, 3, 4)


def internals() -> SimpleNamespace:
    """The sigmatune internals this script times, in one place."""
    from sigmatune.ops import transform_kernel

    return SimpleNamespace(
        kernel=transform_kernel.fused_transform,  # (out, projection, grad); shape= launches it at a given shape
        chosen=lambda r: transform_kernel.launch_shape(transform_kernel.padded_rank(r)),
        padded_rank=transform_kernel.padded_rank,
        shapes_file=Path(transform_kernel.__file__).parent / "launch_shapes.json",  # the table it reads
    )


def time_shape(
    ops, shape: tuple[int, ...] | None, a, basis, g, calls: int, expected: list
) -> tuple[float, float]:
    """(forward µs, backward µs) with the kernel launched at `shape` (None: launch_shape's own, whose results
    are put in `expected`; every other shape must reproduce them, up to the order of fp32 sums)."""
    out, saved, _ = ops.kernel(a, basis, g, transposed=True, shape=shape)
    grad_a, _, grad_g = ops.kernel(a, basis, g, saved=saved, shape=shape)
    results = (out, saved, grad_a, grad_g)
    if shape is None:
        expected[:] = results
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    forward = common.host_and_gpu_us(
        lambda: ops.kernel(a, basis, g, transposed=True, shape=shape), a.device, calls, 3
    )[1]
    backward = common.host_and_gpu_us(
        lambda: ops.kernel(a, basis, g, saved=saved, shape=shape), a.device, calls, 3
    )[1]
    return forward, backward


def main() -> None:
    options = common.parser(__doc__, out="transform_shapes.json")
    options.add_argument("--n", type=int, default=4096)
    options.add_argument("--d", type=int, default=2048)
    options.add_argument("--ranks", default="16,64")
    options.add_argument(
        "--write-shapes",
        action="store_true",
        help="put the fastest shapes into the kernel's table for this GPU",
    )
    options.add_argument(
        "--calls", type=int, default=40, help="calls per timing (all queued behind the sleep)"
    )
    options.add_argument(
        "--grid", default=None, help="a smaller grid, e.g. 16,32/4/64/3 (rows/warps/columns/stages)"
    )
    args = options.parse_args()
    ops = internals()
    device = common.pick_device(args.device)
    grid = (ROWS, WARPS, COLUMNS, STAGES)
    if args.grid:
        grid = tuple(tuple(common.ints(part)) for part in args.grid.split("/"))
    rows = []
    for r in common.ints(args.ranks):
        generator = torch.Generator().manual_seed(r)
        a = torch.randn(args.n, args.d, generator=generator).to(device, torch.bfloat16)
        basis = torch.linalg.qr(torch.randn(args.d, r, generator=generator))[0].to(device, torch.bfloat16)
        g = (0.1 * torch.randn(r, generator=generator)).to(device)
        expected = []
        for shape in [None, *itertools.product(*grid)]:
            try:
                forward, backward = time_shape(ops, shape, a, basis, g, args.calls, expected)
            except Exception as err:  # e.g. Triton's OutOfResources: the shape needs more shared memory
                print(f"r={r:4d} {list(shape)}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            rows.append(
                dict(
                    rank=r, shape=list(shape or ops.chosen(r)), chosen=shape is None,
                    forward_us=round(forward, 2), backward_us=round(backward, 2),
                )
            )  # fmt: skip
            label = f"{rows[-1]['shape']}" + (" chosen" if shape is None else "")
            print(f"r={r:4d} {label:28s} forward {forward:8.2f} µs  backward {backward:8.2f} µs", flush=True)
    print("\nfastest shapes (forward + backward):")
    for r in sorted({row["rank"] for row in rows}):
        mine = sorted(
            (row for row in rows if row["rank"] == r), key=lambda x: x["forward_us"] + x["backward_us"]
        )
        for row in mine[:5]:
            print(f"  r={r} {row['shape']} {row['forward_us']} + {row['backward_us']} µs")
        chosen = next(row for row in mine if row["chosen"])
        print(f"  r={r} chosen {chosen['shape']} {chosen['forward_us']} + {chosen['backward_us']} µs")
    facts = dict(n=args.n, d=args.d, device=common.device_name(device), torch=torch.__version__)
    common.write_json(args.out, dict(facts=facts, rows=rows))
    print(f"wrote {args.out}")
    if args.write_shapes:
        write_shapes(rows, common.device_name(device), ops)


def write_shapes(rows: list[dict], device: str, ops) -> None:
    """Put the fastest shape of each swept rank into the kernel's table (src/sigmatune/ops/
    launch_shapes.json) under this GPU's name, keyed by the padded rank it serves up to."""
    path = Path(ops.shapes_file)
    table = json.loads(path.read_text(encoding="utf-8"))
    fastest = {}
    for r in sorted({row["rank"] for row in rows}):
        best = min(
            (row for row in rows if row["rank"] == r), key=lambda x: x["forward_us"] + x["backward_us"]
        )
        fastest[str(ops.padded_rank(r))] = best["shape"]
    table["transform"][device] = fastest
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(f"wrote the fastest shapes for {device} into {path}: {fastest}")


if __name__ == "__main__":
    main()
