"""Where a decode step's time goes in the serving engine: host versus GPU, and the top kernels of one
graph replay, for the base engine and mixed banks (every row its own adapter).

    python benchmarks/profile_serve.py [--shape 1.1b] [--batches 64,1024] [--ranks 16,128] [--top 12]
        [--launch 16/11/128/4/0,64/16/128/4/0]

Per configuration: the wall time of an engine step while decoding (serve.py's run, PROMPT + DECODE), the
GPU time of replaying that step's graph alone (CUDA events over REPLAYS replays), and the kernels of
one replay by total GPU time. --launch: instead of launch_shape's choice, each given shape of the
mixed-batch kernel (rows per program / column blocks / columns per step / warps / shared 0 or 1) for every
decode launch of the bank, one engine each — an A/B of shapes inside the model's step, where the kernel's inputs
come warm from the layer before (rows_kernel.py times it alone).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from rows_kernel import replay_ms
from serve import DECODE, PROMPT, engine_run, random_adapters
from train_step import SHAPES, TARGETS, build

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.core import rows_kernels
from sigmatune.serving.engine import Engine

REPLAYS = 20


def top_kernels(engine: Engine, batch: int, reach: int, top: int) -> str:
    graph, _ = engine.decoder._graph(batch, reach)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    count = sum(e.count for e in events)
    lines = [f"  {count} kernels, {total / 1000:.3f} ms GPU"]
    for e in events[:top]:
        lines.append(f"  {e.device_time_total / 1000:7.3f} ms {e.count:5d}×  {e.key[:90]}")
    return "\n".join(lines)


def report(label: str, engine: Engine, names: list[str], vocab: int, batch: int, top: int) -> None:
    engine_run(engine, names, vocab, 4)
    _, tps = engine_run(engine, names, vocab, DECODE)
    step_ms = 1000 * batch / tps
    reach = engine.decoder._reach(PROMPT + DECODE)
    gpu = replay_ms(engine.decoder._graph(batch, reach)[0], REPLAYS)
    print(
        f"{label} B={batch}: step {step_ms:.3f} ms wall, replay {gpu:.3f} ms GPU (reach {reach})", flush=True
    )
    print(top_kernels(engine, batch, reach, top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="1.1b")
    parser.add_argument("--batches", default="64,1024")
    parser.add_argument("--ranks", default="16,128")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--launch", default="", help="kernel shapes to compare, e.g. 16/11/128/4/0,64/16/128/4/0"
    )
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in text.split("/")) for text in args.launch.split(",") if text]
    batches = [int(b) for b in args.batches.split(",") if b]
    model = build(args.shape).eval()
    vocab, length = model.config.vocab_size, PROMPT + DECODE
    for batch in batches:
        engine = Engine(model, max_batch=batch, max_len=length, prefill_tokens=batch * PROMPT)
        report("base", engine, ["base"] * batch, vocab, batch, args.top)
        del engine
    cache_dir = tempfile.mkdtemp()
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        config = SigmaConfig(rank=rank, target_modules=TARGETS, cache_dir=cache_dir)
        bank = AdapterBank.over(copy.deepcopy(model), config)
        for batch in batches:
            names = random_adapters(bank, batch, f"r{rank}b{batch}-")
            for shape in shapes or [None]:
                chosen = rows_kernels.launch_shape
                if (
                    shape is not None
                ):  # every decode launch takes this shape (prefill's, of B·PROMPT rows, not)
                    rows_kernels.launch_shape = lambda n, *rest, s=shape, b=batch, c=chosen: (
                        (*s[:4], bool(s[4])) if n == b else c(n, *rest)
                    )
                try:
                    engine = Engine(bank, max_batch=batch, max_len=length, prefill_tokens=batch * PROMPT)
                    report(f"r{rank} A=B launch {shape or 'default'}", engine, names, vocab, batch, args.top)
                except ValueError as err:  # a shared grid that does not fit on the GPU
                    print(f"r{rank} B={batch} launch {shape}: {err}", flush=True)
                finally:
                    rows_kernels.launch_shape = chosen
                    engine = None
        del bank


if __name__ == "__main__":
    main()
