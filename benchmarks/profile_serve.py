"""Where a decode step's time goes in the serving engine: host versus GPU, and the top kernels of one
graph replay, for the base engine and mixed banks (every row its own adapter).

    python benchmarks/profile_serve.py [--shape 1.1b] [--batches 64,1024] [--ranks 16,128] [--top 12]
        [--folded 1,outputs,inputs,all,0] [--expand 64/64/32/8,64/128/32/8] [--launch 16/11/128/4/0,64/16/128/4/0]

Per configuration: the wall time of an engine step while decoding (serve.py's run, PROMPT + DECODE), the
GPU time of replaying that step's graph alone (CUDA events over REPLAYS replays), and the kernels of
one replay by total GPU time. --folded: one engine each for SIGMATUNE_FOLDED's modes (serving/folded.py):
1 (q k v, o and down with their weights folded, gate's group its projections alone), outputs (gate's
weight folded too), inputs (only each group's first weight), all (up's too), 0 (no fold). --expand:
instead of expand_shape's choice, each given shape of the expansion after a folded GEMM (rows / columns
per block / blocks per program / warps [/ stages / early]) for every decode launch; --launch likewise for
the unfolded mixed-batch kernel (rows per program / column blocks / columns per step / warps / shared 0
or 1) — A/Bs of shapes inside the model's step, where the kernels' inputs come warm from the layer before
(rows_kernel.py times the unfolded kernel alone).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile

import torch
from rows_kernel import replay_ms
from serve import DECODE, PROMPT, engine_run, random_adapters
from train_step import SHAPES, TARGETS, build

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.core import fold_kernels, rows_kernels
from sigmatune.serving import folded
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
        "--folded",
        default="1",
        help="SIGMATUNE_FOLDED modes to compare: 1, outputs, inputs, all, 0",
    )
    parser.add_argument("--expand", default="", help="expansion shapes to compare, e.g. default,64/64/4/8")
    parser.add_argument(
        "--launch", default="", help="kernel shapes to compare, e.g. 16/11/128/4/0,64/16/128/4/0"
    )
    args = parser.parse_args()
    expands, launches = (
        [
            None if text == "default" else tuple(int(v) for v in text.split("/"))
            for text in given.split(",")
            if text
        ]
        for given in (args.expand, args.launch)
    )
    variants = [
        (fold, shape)
        for fold in args.folded.split(",")
        for shape in (expands if fold != "0" else launches) or [None]
    ]
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
            for fold, shape in variants:
                label = f"r{rank} A=B folded={fold} {'/'.join(map(str, shape or ())) or 'default'}"
                try:
                    with decode_shape(fold, shape, batch):
                        engine = Engine(bank, max_batch=batch, max_len=length, prefill_tokens=batch * PROMPT)
                        report(label, engine, names, vocab, batch, args.top)
                except ValueError as err:  # a shared grid that does not fit on the GPU
                    print(f"{label} B={batch}: {err}", flush=True)
                finally:
                    engine = None
        del bank


@contextlib.contextmanager
def decode_shape(fold: str, shape, batch: int):
    """Within: folded as SIGMATUNE_FOLDED=fold would, and every decode launch (of `batch` rows; prefill's,
    of B·PROMPT, keep the default) in this shape of the expansion (folded) or of the unfolded kernel."""
    module, name = (fold_kernels, "expand_shape") if fold != "0" else (rows_kernels, "launch_shape")
    chosen, mode = getattr(module, name), folded.MODE
    if shape is not None:
        typed = (*shape[:4], bool(shape[4])) if fold == "0" else shape
        setattr(module, name, lambda n, *rest: typed if n == batch else chosen(n, *rest))
    folded.MODE = fold
    try:
        yield
    finally:
        setattr(module, name, chosen)
        folded.MODE = mode


if __name__ == "__main__":
    main()
