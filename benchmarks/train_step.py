"""What does a training step cost with each adapter, against the frozen model's step (time and peak memory)?

    python benchmarks/train_step.py --shape 1.1b [--tokens 4x1024] [--rows all|eager|compiled|graphed|...] [--rounds N]
    python benchmarks/train_step.py --table-from results/train_step.json     # the rows as a markdown table

A Llama-shaped model with random bf16 weights; targets: all 7 linear types. Rows: the frozen model
(no trainable weights, input gradients on), sigmatune r=16, 64, full (and its band structure as method
sigmatune-band<b>, e.g. --rows sigmatune-band1:full,sigmatune-band4:64), PEFT LoRA r=16 (alpha 32),
eigentune 0.2.0 r=16/64 (backends torch and auto), each in a mode (`mode` in the results):
  eager      the model as it is (the HF Trainer's default)
  compiled   torch.compile(fullgraph=True): each decoder layer its own region (--compile regions, the
             default: one compile serves all 22), or the whole model (--compile model)
  graphed    the whole model compiled with mode="reduce-overhead": forward and backward replayed as CUDA
             graphs
A row spec is method:rank[:e|c|g] (e by default). Per row: init seconds (cold, and warm from the basis
cache), trainable parameters, seconds to the end of the first step (compile included), median step ms over
--steps timed steps after --warmup (synchronised around each; with --rounds N the rows are measured
round-robin N times and the median is over every round's steps, `rounds` listing each round's median: an
eager step is bound by the host, whose speed drifts), ratio to the frozen step of the same mode, peak
allocated GiB and its ratio. Rows are merged into results/train_step.json by row_key.

Each sigmatune row also carries `floor_ratio`: the frozen step plus the least time its transform can take on
this GPU, over the frozen step. Per adapted layer, with d the width of the side the transform acts on (the
smaller: d = min(in, out), ARCHITECTURE.md's input and output sides), adapter width r, band b and N tokens, the
one-sided transform x' = x + ((x V) C) Vᵀ must move at least
    bytes = 2 (4 N d + 2 N r)          read x, write x'; read dx', write dx; write and read x V (bf16)
and compute at least
    flops = 8 N d r + 6 N r (2b + 1)   x V and its product with Vᵀ, each way; the mix and its gradient
so it takes at least max(bytes / bandwidth, flops / matmul rate), both measured on the device in the same
process (`bandwidth_gbs`, `matmul_tflops` in the rows). Other rows' floor_ratio is null.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import common
import torch

torch._dynamo.config.recompile_limit = 64  # one compiled region per decoder layer may specialise per layer


def row_key(row: dict) -> tuple:
    """What one row measures (rows of other GPUs are kept); rows from before `mode` read it from `compiled`."""
    mode = row.get("mode") or ("compiled" if row["compiled"] else "eager")
    return row["shape"], row["method"], str(row["rank"]), mode, row["tokens"], row["device"]


def rows_for(which: str) -> list[tuple[str, object, str]]:
    """(method, rank, mode) for `all`, one mode's name, or a list of method:rank[:e|c|g]."""
    every = [("frozen", 0), ("sigmatune", 16), ("sigmatune", 64), ("sigmatune", "full"), ("lora", 16)]
    every += [("sigmatune-band1", "full"), ("sigmatune-band4", "full")]
    peers = [(f"eigentune-{b}", r) for b in ("torch", "auto") for r in (16, 64)]
    if which in ("all", *common.MODES.values()):
        modes = list(common.MODES.values()) if which == "all" else [which]
        return [(m, r, mode) for mode in modes for m, r in every + (peers if mode == "eager" else [])]
    rows = []
    for spec in which.split(","):
        method, rank, *mode = spec.split(":")
        rows.append((method, rank if rank == "full" else int(rank), common.MODES[mode[0] if mode else "e"]))
    return rows


def main() -> None:
    options = common.parser(__doc__, out="train_step.json")
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--tokens", default="4x1024", help="batch x sequence length")
    options.add_argument(
        "--rows", default="all", help="all, eager, compiled, graphed, or method:rank[:e|c|g],..."
    )
    options.add_argument(
        "--compile", choices=["model", "regions"], default="regions", help="what compiled rows compile"
    )
    options.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    options.add_argument("--steps", type=int, default=7, help="timed steps per row and round")
    options.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the rows round-robin this many times (step ms: the "
        "median of every round's timed steps; `rounds` lists each round's median)",
    )
    options.add_argument(
        "--table-from", metavar="JSON", type=Path, help="only print this results file's table"
    )
    args = options.parse_args()
    if args.table_from:
        print(markdown(json.loads(args.table_from.read_text())))
        return
    tokens = common.batch_shape(args.tokens)
    rows = rows_for(args.rows)
    device = common.pick_device(args.device)
    base = common.build(args.shape, device)
    speeds = device_speeds(device)
    measured = {}  # (method, rank, mode) → what its rounds gave
    order = list(common.MODES.values())
    ordered = sorted(rows, key=lambda r: (order.index(r[2]), r[0] != "frozen"))
    for turn in range(args.rounds):  # round-robin: a slow spell of the host falls on every row alike
        for method, rank, mode in ordered:
            unwrap = None
            try:
                model, unwrap, init_s, init_warm_s = common.timed_init(base, method, rank)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                regions = args.compile == "regions"
                times, peak, first_s = common.train_steps(
                    model, base, mode, regions, tokens, args.warmup, args.steps
                )
            except Exception as err:  # a failing peer must not lose the other rows
                print(f"{method} r={rank} {mode}: FAILED {type(err).__name__}: {err}"[:2000], flush=True)
                continue
            finally:
                if unwrap is not None:
                    unwrap()
            entry = measured.setdefault(
                (method, rank, mode), dict(init=(init_s, init_warm_s), trainable=trainable, first=first_s)
            )
            entry.setdefault("times", []).extend(times)
            entry.setdefault("rounds", []).append(statistics.median(times))
            entry["peak"] = max(entry.get("peak", peak), peak)
            print(f"{method} r={rank} {mode} round {turn + 1}: {statistics.median(times):.2f} ms", flush=True)
            common.merge_rows(
                args.out, rows_of(measured, args, tokens, common.device_name(device), speeds), row_key
            )
    results = rows_of(measured, args, tokens, common.device_name(device), speeds)
    for row in results:
        print(json.dumps(row), flush=True)
    print(
        f"floor: {speeds[0] / 1e9:.0f} GB/s, {speeds[1] / 1e12:.0f} TFLOP/s measured on {device}", flush=True
    )
    print(markdown(common.merge_rows(args.out, results, row_key)))


def device_speeds(device: torch.device) -> tuple[float, float]:
    """(bytes/s a copy moves, flop/s of a bf16 matmul) on the device: the rates the floor is made of, each
    timed as common.host_and_gpu_us times a call (back to back on the GPU, after warm-up calls)."""
    size = 2**29 if device.type == "cuda" else 2**22  # elements: 1 GiB of bf16 on a GPU
    source = torch.randn(size, device=device).bfloat16()
    target = torch.empty_like(source)
    copy_us = common.host_and_gpu_us(lambda: target.copy_(source), device, calls=5, repeats=3)[1]
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device).bfloat16(), torch.randn(n, n, device=device).bfloat16()
    matmul_us = common.host_and_gpu_us(lambda: a @ b, device, calls=5, repeats=3)[1]
    return 2 * 2 * size / (copy_us * 1e-6), 2 * n**3 / (matmul_us * 1e-6)


def floor_ms(shape: str, rank, band: int, tokens: int, speeds: tuple[float, float]) -> float:
    """The least ms the adapter's transforms add to a step (the module docstring's bytes and flops)."""
    bandwidth, rate = speeds
    total = 0.0
    for out, inp, count in common.weight_shapes(shape):
        d = min(out, inp)  # the side the transform acts on
        r = d if rank == "full" else min(rank, d)
        moved = 2 * (4 * tokens * d + 2 * tokens * r)
        flops = 8 * tokens * d * r + 6 * tokens * r * (2 * band + 1)
        total += count * max(moved / bandwidth, flops / rate)
    return 1000 * total


def rows_of(
    measured: dict, args, tokens: tuple[int, int], device: str, speeds: tuple[float, float]
) -> list[dict]:
    """The results rows of what has been measured so far (ratios to the frozen row of the same mode)."""
    results = []
    for (method, rank, mode), entry in measured.items():
        step_ms, peak = statistics.median(entry["times"]), entry["peak"]
        frozen = measured.get(("frozen", 0, mode))
        ref_ms = statistics.median(frozen["times"]) if frozen else float("nan")
        ref_peak = frozen["peak"] if frozen else float("nan")
        init_s, init_warm_s = entry["init"]
        structure = common.structure_of(method)
        floor = None
        if structure:
            least = floor_ms(args.shape, rank, structure["band"], tokens[0] * tokens[1], speeds)
            floor = round((ref_ms + least) / ref_ms, 3)
        row = dict(
            shape=args.shape, method=method, rank=rank, compiled=mode != "eager", mode=mode,
            **structure, tokens=tokens[0] * tokens[1],
            init_s=round(init_s, 3), init_warm_s=None if init_warm_s is None else round(init_warm_s, 3),
            trainable=entry["trainable"], first_step_s=round(entry["first"], 1), step_ms=round(step_ms, 2),
            ratio_vs_frozen=round(step_ms / ref_ms, 3), floor_ratio=floor,
            bandwidth_gbs=round(speeds[0] / 1e9), matmul_tflops=round(speeds[1] / 1e12, 1), peak_gib=round(peak, 2),
            peak_ratio_vs_frozen=round(peak / ref_peak, 3), device=device,
            compile={"eager": None, "compiled": args.compile, "graphed": "model"}[mode],
            rounds=[round(ms, 2) for ms in entry["rounds"]],
        )  # fmt: skip
        results.append(row)
    return results


def markdown(rows: list[dict]) -> str:
    head = "| device | shape | tokens | method | rank | mode | init s (warm) | trainable | step ms | × frozen | floor | peak GiB | × frozen |"
    lines = [head, "|" + "---|" * 13]
    order = list(common.MODES.values())
    for r in sorted(rows, key=lambda r: (*row_key(r)[4:], r["shape"], order.index(row_key(r)[3]), r["method"] != "frozen", r["method"], str(r["rank"]))):  # fmt: skip
        warm = "" if r["init_warm_s"] is None else f" ({r['init_warm_s']:.2f})"
        floor = "" if r.get("floor_ratio") is None else f"{r['floor_ratio']:.2f}"
        lines.append(
            f"| {r['device'].removeprefix('NVIDIA ')} | {r['shape']} | {r['tokens']} | {r['method']} | {r['rank']} | "
            f"{row_key(r)[3]} | {r['init_s']:.2f}{warm} | {r['trainable']:,} | {r['step_ms']:.1f} | "
            f"{r['ratio_vs_frozen']:.2f} | {floor} | {r['peak_gib']:.2f} | {r['peak_ratio_vs_frozen']:.3f} |"
        )
    return (
        "\n".join(lines)
        + "\n\nEach ratio is to the frozen row of the same device, shape and mode measured in the"
        " same process; the frozen rows shown are from the last process that measured them.\n"
    )


if __name__ == "__main__":
    main()
