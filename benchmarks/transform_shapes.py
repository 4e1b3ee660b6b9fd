"""GPU time of the training transform's kernel (kernels.transform, forward and backward) for each launch shape.

    python benchmarks/transform_shapes.py [--n 4096] [--d 2048] [--ranks 16,64] [--out results/transform_shapes.json]

A compiled or graphed training step is bound by the GPU: the transform's share of it is one forward and one
backward launch per adapted layer (at the 1.1B Llama shape, d = 2,048 for 5 of the 7 layer types). For each
padded rank this times every shape in the grid below — rows per program, warps, columns per step, pipeline
stages — as kernels.launch_shape would pass it (SIGMATUNE_TRANSFORM_SHAPE), the calls queued behind a GPU
sleep and run back to back (layer_overhead.timed), bf16 activations, a diagonal g. The row `chosen` marks
launch_shape's own answer, whose results every other shape must reproduce (else the shape is reported as
failed); the summary lists the fastest shapes by forward + backward µs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from layer_overhead import timed

from sigmatune.core import kernels

ROWS, WARPS, COLUMNS, STAGES = (16, 32, 64), (4, 8), (64, 128, 256), (2, 3, 4)
CALLS = 40  # all queued behind the GPU's sleep (layer_overhead.timed)
RESULTS = Path(__file__).parent / "results" / "transform_shapes.json"


def per_call_us(fn, calls: int) -> float:
    """GPU µs per call: on a GPU, layer_overhead.timed (the GPU held by a sleep while the calls are issued, so
    that they run back to back: a launch issues slower than this kernel runs); on CPU, wall time."""
    if torch.cuda.is_available():
        return timed(fn, calls, repeats=3)[1]
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def time_shape(shape: tuple[int, ...] | None, a, basis, g, calls: int) -> tuple[float, float]:
    """(forward µs, backward µs) with the kernel launched at `shape` (None: launch_shape's own)."""
    kernels.SHAPE_OVERRIDE = None if shape is None else ",".join(map(str, shape))
    kernels._setup.cache_clear()
    try:
        out, saved, _ = kernels.transform(a, basis, g, transposed=True)
        grad_a, _, grad_g = kernels.transform(a, basis, g, saved=saved)
        check(shape, (out, saved, grad_a, grad_g))
        forward = per_call_us(lambda: kernels.transform(a, basis, g, transposed=True), calls)
        backward = per_call_us(lambda: kernels.transform(a, basis, g, saved=saved), calls)
    finally:
        kernels.SHAPE_OVERRIDE = None
        kernels._setup.cache_clear()
    return forward, backward


_EXPECTED = {}  # rank → the results of launch_shape's own shape, which every other shape must reproduce


def check(shape, results) -> None:
    """Every shape computes what launch_shape's own does (up to the order of fp32 sums)."""
    rank = results[1].shape[1]
    if shape is None:
        _EXPECTED[rank] = results
        return
    for got, expected in zip(results, _EXPECTED[rank], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The options of a transform benchmark: --n rows, --d columns, --ranks, --calls per timing."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--calls", type=int, default=CALLS)
    return parser


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument(
        "--grid", default=None, help="a smaller grid, e.g. 16,32/4/64/3 (rows/warps/columns/stages)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = (ROWS, WARPS, COLUMNS, STAGES)
    if args.grid:
        grid = tuple(tuple(int(v) for v in part.split(",")) for part in args.grid.split("/"))
    rows = []
    for r in (int(v) for v in args.ranks.split(",")):
        generator = torch.Generator().manual_seed(r)
        a = torch.randn(args.n, args.d, generator=generator).to(device, torch.bfloat16)
        basis = torch.linalg.qr(torch.randn(args.d, r, generator=generator))[0].to(device, torch.bfloat16)
        g = (0.1 * torch.randn(r, generator=generator)).to(device)
        chosen = kernels.launch_shape(kernels.padded_rank(r))
        for shape in [None, *itertools.product(*grid)]:
            try:
                forward, backward = time_shape(shape, a, basis, g, args.calls)
            except Exception as err:  # e.g. Triton's OutOfResources: the shape needs more shared memory
                print(f"r={r:4d} {list(shape)}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            rows.append(
                dict(
                    rank=r, shape=list(shape or chosen), chosen=shape is None,
                    forward_us=round(forward, 2), backward_us=round(backward, 2),
                )
            )  # fmt: skip
            label = f"{rows[-1]['shape']}" + (" chosen" if shape is None else "")
            print(f"r={r:4d} {label:28s} forward {forward:8.2f} µs  backward {backward:8.2f} µs", flush=True)
    facts = dict(n=args.n, d=args.d, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    facts["torch"] = torch.__version__
    print("\nfastest shapes (forward + backward):")
    for r in sorted({row["rank"] for row in rows}):
        mine = sorted(
            (row for row in rows if row["rank"] == r), key=lambda x: x["forward_us"] + x["backward_us"]
        )
        for row in mine[:5]:
            print(f"  r={r} {row['shape']} {row['forward_us']} + {row['backward_us']} µs")
        chosen = next(row for row in mine if row["chosen"])
        print(f"  r={r} chosen {chosen['shape']} {chosen['forward_us']} + {chosen['backward_us']} µs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(dict(facts=facts, rows=rows), indent=1) + "\n")
    temporary.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
