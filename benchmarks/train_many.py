"""What does training K adapters at once cost, against one adapter on the same rows?

    python benchmarks/train_many.py --shape 1.1b --tokens 512x8 --adapters 1,8,64,512 --modes eager,compiled
    python benchmarks/train_many.py --sweep          # also: a 3-lr sweep against three runs one after another

A Llama-shaped model with random bf16 weights, all 7 linear types adapted (--rank; the GPU recipe, the full
spectrum, by default). One batch of --tokens (rows x length) per step: the `one` row trains one adapter on all
of it (the one-adapter path, a torch AdamW); an `adapters` = K row trains K adapters together
(model/together.py, training/rows_adamw.py), rows / K rows each — the same work, with a gather of each row's
coefficients per layer and a scatter-add of their gradients. Per row: step ms (median over --steps timed
steps after --warmup, synchronised; --rounds round-robin rounds), ratio_vs_one (this row's step ÷ the one
adapter's step on the same rows, same mode, same process); the one adapter's step and peak GiB are printed.
Modes: eager; compiled (each decoder layer its own region).

--sweep adds a `mode` = sweep row, on --sweep-shape (SmolLM2-135M's: the default job's model, which leaves a
GPU idle): the wall seconds of --sweep-steps steps of 3 adapters trained together on the same batches (3 × B
rows) against three one-adapter runs of B rows one after another (ratio_vs_one: together ÷ (the three runs'
sum ÷ 3), i.e. "× one run"; three runs one after another are 3.0). Rows hold exactly the keys adapters, rows,
mode, step_ms, ratio_vs_one, device (KEYS).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common
import torch

from sigmatune import SigmaConfig, get_sigma_model
from sigmatune.model.together import Together
from sigmatune.training.rows_adamw import RowsAdamW, clip_rows

torch._dynamo.config.recompile_limit = 64  # one compiled region per decoder layer may specialise per layer


KEYS = (
    "adapters",
    "rows",
    "mode",
    "step_ms",
    "ratio_vs_one",
    "device",
)  # exactly these: other tools read them


def row_key(row: dict) -> tuple:
    return row["adapters"], row["rows"], row["mode"], row["device"]


def wrapped(base, rank, adapters: int, cache: str):
    """The model with `adapters` adapters of one config, randomly initialised (a trained state's cost)."""
    config = SigmaConfig(rank=rank, target_modules=common.TARGETS, cache_dir=cache)
    model = get_sigma_model(base, config, "a0", progress=False)
    for k in range(1, adapters):
        model.add_adapter(f"a{k}", config)
    return model


def step_times(
    model, base, mode: str, tokens: tuple[int, int], adapters: int | None, warmup: int, timed: int
):
    """([step ms], peak GiB): forward, backward, per-adapter clip and AdamW step, on one batch of `tokens`;
    adapters None: the one-adapter path (clip_grad_norm_ and torch's fused AdamW)."""
    device = base.get_input_embeddings().weight.device
    runner = common.runner_for(model, base, mode, regions=True)
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, tokens, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    together = None
    if adapters is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    else:
        together = Together(model, [f"a{k}" for k in range(adapters)]).__enter__()
        params = list(together.banks().values())
        optimizer = RowsAdamW(params, torch.full((adapters,), 1e-4))
        together.rows(torch.arange(tokens[0], device=device) % adapters)
    times = []
    try:
        for step in range(warmup + timed):
            common.sync()
            start = time.perf_counter()
            loss = runner(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if adapters is None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            else:
                clip_rows(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.sync()
            if step >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    finally:
        if together is not None:
            together.__exit__(None, None, None)
        common.uncompile(base)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return times, peak


def sweep_seconds(base, rank, tokens: tuple[int, int], steps: int, cache: str) -> tuple[float, float]:
    """(seconds of 3 adapters trained together on 3 × B rows, seconds of 3 one-adapter runs of B rows)."""
    batch, length = tokens
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(base.get_input_embeddings().weight.device)
    model = wrapped(base, rank, 3, cache)
    try:
        alone = 0.0
        for k in range(3):
            model.set_adapter(f"a{k}")
            times, _ = step_times(model, base, "eager", (batch, length), None, 1, steps)
            alone += sum(times) / 1000
        times, _ = step_times(model, base, "eager", (3 * batch, length), 3, 1, steps)
        return sum(times) / 1000, alone
    finally:
        model.unload()


def rows_of(measured: dict, args, tokens, rank, device: str) -> list[dict]:
    """The results rows measured so far: each K against the one adapter's step in its mode."""
    rows = []
    for (mode, adapters), entry in measured.items():
        if adapters is None or (mode, None) not in measured:
            continue
        one = statistics.median(measured[mode, None]["times"])
        step = statistics.median(entry["times"])
        rows.append(dict(adapters=adapters, rows=tokens[0], mode=mode, step_ms=round(step, 2),
                         ratio_vs_one=round(step / one, 3), device=device))  # fmt: skip
        print(f"{mode} K={adapters}: {step:.2f} ms, one adapter {one:.2f} ms, peak {entry['peak']:.2f} GiB")
    return rows


def main() -> None:
    options = common.parser(__doc__, out="train_many.json")
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--tokens", default="512x8", help="rows x sequence length of one step's batch")
    options.add_argument("--adapters", default="1,8,64,512", help="K: adapters trained together")
    options.add_argument("--modes", default="eager,compiled", help="eager, compiled")
    options.add_argument("--rank", default="full", help="the adapters' rank (full: the GPU recipe)")
    options.add_argument("--warmup", type=int, default=3)
    options.add_argument("--steps", type=int, default=7)
    options.add_argument("--rounds", type=int, default=1)
    options.add_argument("--sweep", action="store_true", help="also time a 3-lr sweep against three runs")
    options.add_argument("--sweep-shape", choices=common.SHAPES, default="135m", help="the sweep rows' model")
    options.add_argument("--sweep-tokens", default="8x64", help="one run's batch in the sweep rows")
    options.add_argument("--sweep-steps", type=int, default=10)
    args = options.parse_args()
    rank = args.rank if args.rank == "full" else int(args.rank)
    tokens = common.batch_shape(args.tokens)
    device = common.pick_device(args.device)
    name = common.device_name(device)
    base = common.build(args.shape, device)
    cache = tempfile.mkdtemp(prefix="bases-")
    counts = common.ints(args.adapters)
    if any(tokens[0] % k for k in counts):
        raise SystemExit(f"--tokens {args.tokens}: the rows must divide among every K of {counts}")
    measured: dict[tuple[str, int | None], dict] = {}
    start = time.perf_counter()
    model = wrapped(base, rank, max(counts), cache)
    print(f"{max(counts)} adapters added in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        for turn in range(args.rounds):
            for mode in args.modes.split(","):
                for adapters in [None, *counts]:
                    model.set_adapter("a0")
                    times, peak = step_times(model, base, mode, tokens, adapters, args.warmup, args.steps)
                    entry = measured.setdefault((mode, adapters), {"times": [], "peak": 0.0})
                    entry["times"] += times
                    entry["peak"] = max(entry["peak"], peak)
                    label = "one" if adapters is None else f"K={adapters}"
                    print(f"{mode} {label} round {turn + 1}: {statistics.median(times):.2f} ms", flush=True)
                    common.merge_rows(args.out, rows_of(measured, args, tokens, rank, name), row_key)  # kept
    finally:
        model.unload()
    rows = rows_of(measured, args, tokens, rank, name)
    if args.sweep:
        sweep = common.batch_shape(args.sweep_tokens)
        del base
        small = common.build(args.sweep_shape, device)
        together_s, alone_s = sweep_seconds(small, rank, sweep, args.sweep_steps, cache)
        rows.append(dict(adapters=3, rows=3 * sweep[0], mode="sweep",
                         step_ms=round(1000 * together_s / args.sweep_steps, 2),
                         ratio_vs_one=round(together_s / (alone_s / 3), 3), device=name))  # fmt: skip
        print(f"sweep: 3 together {together_s:.2f} s, 3 alone {alone_s:.2f} s")
    merged = common.merge_rows(args.out, rows, row_key)
    print(f"\n| {' | '.join(KEYS)} |\n|{'---|' * len(KEYS)}")
    for row in merged:
        print("| " + " | ".join(str(row[key]) for key in KEYS) + " |")


if __name__ == "__main__":
    main()
