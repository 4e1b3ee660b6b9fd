"""How many training processes does one GPU carry side by side (the quality suite's --workers), and does the
CUDA Multi-Process Service (MPS) let their kernels overlap?

    python benchmarks/side_by_side.py --workers 1,4,8 --tokens 16x48,16x384 [--mps]

A causal row of the quality suite is a small model (SmolLM2-135M's shape, float32 weights, TF32 matmuls) whose
step leaves an H100 mostly idle: its many small kernels are bound by their launches. K processes side by side
fill the gaps only where their kernels may run at once; without MPS, a GPU time-slices between processes. Each
of K processes (this script's `work`) builds the shape (--shape, random weights), puts the default adapter on
all 7 linear types, runs --warmup steps of AdamW on one batch of --tokens, then --steps timed ones, and reports
when they began and ended. A row: workers (K), tokens, mps, step_ms (the processes' median step), steps_per_s
(all K's steps over the span from the first start to the last end), ratio_vs_one (steps_per_s ÷ one process's
on the same tokens and mps, same run: how much more K side by side train than one).

--mps starts an MPS control daemon of this run's own (its pipe and log folders in a temp folder, so nothing
else on the machine talks to it), runs the same rows under it, and stops it; the GPU's settings (compute mode
and the rest) are left alone. Where the daemon does not start, or its clients fail, the rows say so.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import common
import torch

# each work process: one host thread, its lines at once
WORKER = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ANSWER = 4  # tokens of each row's answer: the positions a step's loss is on
ROW_KEY = ("workers", "tokens", "mps", "device")  # a row replaces an earlier one with these values


def work(args) -> None:
    """One process's steps: {"start", "end", "step_ms"} as JSON on its last line of output."""
    from sigmatune import SigmaConfig, get_sigma_model

    device = common.pick_device(args.device)
    torch.set_float32_matmul_precision("high")  # the suite's causal rows: TF32 matmuls
    base = common.build(args.shape, device).float()
    model = get_sigma_model(base, SigmaConfig(target_modules=common.TARGETS), progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, common.batch_shape(args.tokens), device=device)

    def step() -> None:  # the loss on the last ANSWER positions (the suite's: logits where the answer is)
        logits = model(input_ids=ids[:, :-1], logits_to_keep=ANSWER).logits  # (B, ANSWER, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -ANSWER:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start, _, end = common.timed_steps(step, args.warmup, args.steps)
    print(json.dumps({"start": start, "end": end, "step_ms": 1e3 * (end - start) / args.steps}), flush=True)


def side_by_side(args, workers: int, tokens: str, env: dict) -> dict:
    """K work processes at once; their spans → a row (without ratio_vs_one)."""
    command = [sys.executable, __file__, "work", "--device", args.device, "--shape", args.shape]
    command += ["--tokens", tokens, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    try:
        outputs = [proc.communicate(timeout=args.timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"the workers did not end within {args.timeout} s") from None
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a worker failed (exit codes {[p.returncode for p in procs]})")
    spans = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return dict(
        workers=workers,
        tokens=tokens,
        step_ms=round(statistics.median(s["step_ms"] for s in spans), 2),
        steps_per_s=round(workers * args.steps / wall, 2),
    )


def rows_for(args, mps: bool, env: dict, device: str) -> list[dict]:
    rows = []
    for tokens in args.tokens.split(","):
        one = None
        for workers in common.ints(args.workers):
            try:
                row = side_by_side(args, workers, tokens, env)
            except (RuntimeError, json.JSONDecodeError, IndexError) as err:
                print(f"{workers} workers, {tokens}, mps {mps}: {err}", flush=True)
                continue
            one = row["steps_per_s"] if workers == 1 else one
            ratio = round(row["steps_per_s"] / one, 3) if one else None
            rows.append({**row, "mps": mps, "ratio_vs_one": ratio, "device": device})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    options = common.parser(__doc__, out="side_by_side.json")
    options.add_argument("command", nargs="?", choices=["run", "work"], default="run")
    options.add_argument("--shape", default="135m", help="the model's shape (common.SHAPES)")
    options.add_argument("--workers", default="1,4,8", help="processes side by side (1 first: the ratio's)")
    options.add_argument("--tokens", default="16x48,16x384", help="rows x length per step, comma-separated")
    options.add_argument("--warmup", type=int, default=5, help="untimed steps per process")
    options.add_argument("--steps", type=int, default=40, help="timed steps per process")
    options.add_argument("--timeout", type=float, default=300, help="seconds a row's workers may take")
    options.add_argument("--mps", action="store_true", help="also the rows under an MPS daemon of its own")
    args = options.parse_args()
    if args.command == "work":
        return work(args)
    device = common.device_name(common.pick_device(args.device))
    rows = rows_for(args, False, common.worker_env(None, **WORKER), device)
    if args.mps:
        with common.mps_daemon() as mps_env:
            if mps_env is not None:
                rows += rows_for(args, True, common.worker_env(mps_env, **WORKER), device)
    common.merge_rows(args.out, rows, ROW_KEY)
    print("| workers | tokens | mps | step ms | steps/s | × one |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['tokens']} | {r['mps']} | {r['step_ms']} | {r['steps_per_s']} | {r['ratio_vs_one']} |"
        )


if __name__ == "__main__":
    main()
