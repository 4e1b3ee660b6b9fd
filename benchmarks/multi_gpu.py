"""How does sigmatune training scale with DDP and FSDP2 on N GPUs of one host, against 1 GPU, and do N processes
train what one does?

    python benchmarks/multi_gpu.py [--gpus 1,2] [--shapes 1.1b,7b] [--modes ddp,fsdp2]   # the driver
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --worker --mode ddp --shape 1.1b  # one row

Each row is one torchrun job. Every rank builds the same Llama-shaped model (common.SHAPES, random bf16
weights, one seed), wraps it (SigmaConfig rank, cache off: the SVD runs on rank 0 and is broadcast;
init_s = wrap + SVD + broadcast, the slowest rank), then trains --warmup + --steps steps on a global batch
of `--global-batch` sequences × `--length` tokens, each rank its slice (the same global batch whatever N).
Row values:

    tokens_per_s        global batch tokens × steps / seconds of the timed steps
    scaling_efficiency  tokens_per_s(N) / (N · tokens_per_s(1)), same mode and shape (1 GPU: 1.0)
    peak_gib_per_gpu    the largest torch.cuda.max_memory_allocated over the ranks
    grad_rel_diff       ‖∇_N − ∇_1‖ / ‖∇_1‖ of the first step's gradient of all trained values (after the
                        reduction), against the 1-GPU run: the N-process step computes the same gradient
    vectors_rel_diff    ‖g_N − g_1‖ / ‖g_1‖ of the trained values after all steps (AdamW's first steps are
                        nearly sign(∇)·lr, so entries with tiny gradients amplify bf16 rounding: expect more)

`--share-gpu` puts every rank on GPU 0 with gloo (NCCL refuses two ranks on one GPU): a correctness
check of the N-process path on a one-GPU machine, whose timings mean nothing; without CUDA every rank runs
on the CPU over gloo (a check of the script). Rows are merged into results/multi_gpu.json by (method, shape,
gpus, shared); a markdown table is printed.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common
import safetensors.torch
import torch
import torch.distributed as dist

from sigmatune import SigmaConfig, get_sigma_model, read_adapter

KEY = ("method", "shape", "gpus", "shared")


def internals() -> SimpleNamespace:
    """The sigmatune internals this script uses, in one place."""
    from sigmatune.training.distributed import distribute, leave

    return SimpleNamespace(distribute=distribute, leave=leave)


def worker(args) -> None:
    """One row, on every rank of a torchrun job; rank 0 prints the row as JSON."""
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    cuda = common.pick_device(args.device).type == "cuda"  # without CUDA (checking the script): CPU and gloo
    device = torch.device("cuda", 0 if args.share_gpu else local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda and not args.share_gpu else "gloo"
    dist.init_process_group(
        backend, device_id=device if backend == "nccl" else None, timeout=datetime.timedelta(minutes=8)
    )
    ops = internals()
    base = common.build(args.shape, device)  # same seed on every rank: the same weights
    common.sync()
    dist.barrier()
    started = time.perf_counter()
    rank_setting = args.rank if args.rank == "full" else int(args.rank)
    sigma = get_sigma_model(base, SigmaConfig(rank=rank_setting, cache=False), progress=False)
    common.sync()
    init_s = max_over_ranks(time.perf_counter() - started)
    runner = ops.distribute(sigma, args.mode, world, "bfloat16", device)
    params = [p for p in sigma.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    shape = (args.global_batch, args.length)
    batch = torch.randint(0, base.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    mine = batch[rank::world].to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            common.sync()
            dist.barrier()
            timed_from = time.perf_counter()
        loss = runner(input_ids=mine, labels=mine).loss  # equal tokens per rank: the mean of means is global
        loss.backward()
        if step == 0:
            save_gradients(sigma, rank, f"{args.output}-gradients.safetensors")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    common.sync()
    seconds = max_over_ranks(time.perf_counter() - timed_from)
    peak = max_over_ranks(torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0)
    sigma.save_pretrained(args.output)  # collective: rank 0 writes the gathered vectors
    if rank == 0:
        row = {
            "method": args.mode,
            "shape": args.shape,
            "gpus": 1 if args.share_gpu else world,
            "processes": world,
            "shared": args.share_gpu,
            "tokens_per_s": round(args.global_batch * args.length * args.steps / seconds, 1),
            "peak_gib_per_gpu": round(peak, 2),
            "init_s": round(init_s, 2),
            "rank": args.rank,
            "global_batch": args.global_batch,
            "length": args.length,
            "steps": args.warmup + args.steps,
            "backend": backend,
            "device": common.device_name(device),
            "torch": torch.__version__,
        }
        print("ROW " + json.dumps(row), flush=True)
    ops.leave()


def save_gradients(sigma, rank: int, path: str) -> None:
    """The reduced gradient of every trained value (FSDP2 shards gathered on every rank); rank 0 saves."""
    grads = {}
    for name, parameter in sigma.named_parameters():
        if parameter.requires_grad:
            grad = parameter.grad.full_tensor() if hasattr(parameter.grad, "full_tensor") else parameter.grad
            grads[name] = grad.detach().float().cpu()
    if rank == 0:
        safetensors.torch.save_file(grads, path)


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def run_row(mode: str, shape: str, processes: int, share_gpu: bool, args, output: Path) -> dict | None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += [
        __file__,
        "--worker",
        "--mode",
        mode,
        "--shape",
        shape,
        "--rank",
        args.rank,
        "--output",
        str(output),
    ]
    for option in ("device", "global_batch", "length", "warmup", "steps"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--share-gpu"] if share_gpu else []
    print(f"--- {mode} {shape} × {processes} {'(one shared GPU)' if share_gpu else ''}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not rows:
        print(f"failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        return None
    print(json.dumps(rows[0]), flush=True)
    return rows[0]


def vectors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: layer.vector for name, layer in read_adapter(folder).layers.items()}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].double().reshape(-1) for name in sorted(tensors)])


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(f"{float((got - want).norm() / want.norm()):.3g}")


def main() -> None:
    options = common.parser(__doc__, out="multi_gpu.json")
    options.add_argument("--worker", action="store_true", help="run one row (under torchrun)")
    options.add_argument("--mode", default="ddp")
    options.add_argument("--shape", default="1.1b", choices=common.SHAPES)
    options.add_argument("--modes", default="ddp,fsdp2")
    options.add_argument("--shapes", default="1.1b,7b")
    options.add_argument("--gpus", default="1,2", help="GPU counts to run (1 is the reference)")
    options.add_argument("--rank", default="64", help="singular values per layer, or 'full'")
    options.add_argument("--global-batch", type=int, default=8)
    options.add_argument("--length", type=int, default=1024)
    options.add_argument("--warmup", type=int, default=3, help="untimed steps")
    options.add_argument("--steps", type=int, default=10, help="timed steps")
    options.add_argument(
        "--share-gpu", action="store_true", help="all ranks on GPU 0, gloo (correctness only)"
    )
    options.add_argument("--output", default="multi-gpu-adapter", help="(the worker's adapter folder)")
    options.add_argument("--timeout", type=int, default=540, help="seconds per row")
    args = options.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for shape in args.shapes.split(","):
            for mode in args.modes.split(","):
                reference = None
                for n in common.ints(args.gpus):
                    output = Path(scratch) / f"{mode}-{shape}-{n}"
                    row = run_row(mode, shape, n, args.share_gpu and n > 1, args, output)
                    if row is None:
                        continue
                    gradients = flat(safetensors.torch.load_file(f"{output}-gradients.safetensors"))
                    trained = flat(vectors(output))
                    if n == 1:
                        reference = (row, gradients, trained)
                    if reference is not None:
                        base_row, base_gradients, base_trained = reference
                        row["grad_rel_diff"] = relative(gradients, base_gradients)
                        row["vectors_rel_diff"] = relative(trained, base_trained)
                        row["scaling_efficiency"] = (
                            None
                            if row["shared"]
                            else round(row["tokens_per_s"] / (n * base_row["tokens_per_s"]), 3)
                        )
                    rows.append(row)
                    common.merge_rows(args.out, [row], KEY)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | shape | GPUs | processes | tokens/s | scaling eff. | peak GiB/GPU | init s | Δ∇ rel | Δ vectors rel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['gpus']}{' (shared)' if r['shared'] else ''} | {r['processes']} "
            f"| {r['tokens_per_s']:,.0f} | {r.get('scaling_efficiency')} | {r['peak_gib_per_gpu']} | {r['init_s']} "
            f"| {r.get('grad_rel_diff')} | {r.get('vectors_rel_diff')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
