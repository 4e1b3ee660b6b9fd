"""Where does a serving decode step's time go? Host against GPU, and the top kernels of one graph replay, for the
base engine and mixed banks (every row its own adapter); prints, writes no results file.

    python benchmarks/profile_serve.py [--shape 1.1b] [--batches 64,1024] [--ranks 16,128] [--top 12]
        [--folded 1,0] [--expand default,64/128/2/8] [--launch 16/11/128/4/0]

Per configuration: the wall time of an engine step while decoding (serve.py's run), the GPU time of replaying
that step's graph alone (CUDA events over --replays replays), and the kernels of one replay by total GPU time
(on a CPU, which replays no graph: the top operators of a short decode). --folded: one engine each with the
fold on (1: serving/folded.py) or off (0: the bank disables "fold"). --expand: instead of expand_shape's choice, each given shape of the expansion after a
folded GEMM (rows / columns per block / blocks per program / warps [/ stages / early]) for every decode
launch; --launch likewise for the unfolded mixed-batch kernel (rows per program / column blocks / columns per
step / warps / shared 0 or 1) — A/Bs of shapes inside the model's step, where the kernels' inputs come warm
from the layer before (rows_kernel.py times the unfolded kernel alone).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from types import SimpleNamespace

import common
import torch

from sigmatune import AdapterBank, SigmaConfig


def internals() -> SimpleNamespace:
    """The sigmatune internals this script uses, in one place."""
    from sigmatune.serving.ops import fold_kernel, rows_kernel

    def step_graph(engine, batch: int, positions: int) -> torch.cuda.CUDAGraph:
        """The CUDA graph of the engine's decode step for `batch` rows attending over `positions` (captured
        if new): the private SlotDecoder._reach (the attended length's bucket) and _graph."""
        return engine.decoder._graph(batch, engine.decoder._reach(positions))[0]

    @contextlib.contextmanager
    def decode_shape(bank, fold: str, shape, batch: int):
        """Within: the bank folding or not (fold "1" or "0"), and every decode launch of `batch` rows
        (prefill's keep the default) in this shape of the expansion (fold_kernel.expand_shape) or of the
        unfolded kernel (rows_kernel.launch_shape): an A/B inside the model's step."""
        module, name = (fold_kernel, "expand_shape") if fold != "0" else (rows_kernel, "launch_shape")
        chosen, disabled = getattr(module, name), bank.disabled_kernels
        if shape is not None:
            typed = (*shape[:4], bool(shape[4])) if fold == "0" else shape
            setattr(module, name, lambda n, *rest, **kw: typed if n == batch else chosen(n, *rest, **kw))
        bank.disabled_kernels = disabled | ({"fold"} if fold == "0" else set())
        try:
            yield
        finally:
            setattr(module, name, chosen)
            bank.disabled_kernels = disabled

    return SimpleNamespace(step_graph=step_graph, decode_shape=decode_shape)


def top_kernels(run, top: int, cuda: bool) -> str:
    """The kernels of one run() by total GPU time (on a CPU: the operators by their own CPU time)."""
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        run()
        torch.cuda.synchronize() if cuda else None
    events = [e for e in prof.key_averages() if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=lambda e: -time_of(e))
    total, count = sum(time_of(e) for e in events), sum(e.count for e in events)
    lines = [
        f"  {count} {'kernels' if cuda else 'operators'}, {total / 1000:.3f} ms {'GPU' if cuda else 'CPU'}"
    ]
    for e in events[:top]:
        lines.append(f"  {time_of(e) / 1000:7.3f} ms {e.count:5d}×  {e.key[:90]}")
    return "\n".join(lines)


def report(ops, label: str, engine, names: list[str], vocab: int, batch: int, args) -> None:
    common.engine_run(engine, names, vocab, args.prompt, 4)
    _, tps = common.engine_run(engine, names, vocab, args.prompt, args.decode)
    step_ms = 1000 * batch / tps
    if engine.device.type != "cuda":
        print(f"{label} B={batch}: step {step_ms:.3f} ms wall (no graph on a CPU)", flush=True)
        run = lambda: common.engine_run(engine, names, vocab, args.prompt, 2)  # noqa: E731
        print(top_kernels(run, args.top, cuda=False), flush=True)
        return
    graph = ops.step_graph(engine, batch, args.prompt + args.decode)
    gpu = common.replay_ms(graph, args.replays)
    print(f"{label} B={batch}: step {step_ms:.3f} ms wall, replay {gpu:.3f} ms GPU", flush=True)
    print(top_kernels(graph.replay, args.top, cuda=True), flush=True)


def main() -> None:
    options = common.parser(__doc__)
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--batches", default="64,1024")
    options.add_argument("--ranks", default="16,128")
    options.add_argument("--top", type=int, default=12)
    options.add_argument("--folded", default="1", help="the fold on (1) or off (0), e.g. 1,0")
    options.add_argument("--expand", default="", help="expansion shapes to compare, e.g. default,64/64/4/8")
    options.add_argument(
        "--launch", default="", help="kernel shapes to compare, e.g. 16/11/128/4/0,64/16/128/4/0"
    )
    options.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    options.add_argument("--decode", type=int, default=128, help="tokens decoded per request")
    options.add_argument("--replays", type=int, default=20, help="graph replays timed")
    args = options.parse_args()
    ops = internals()
    expands, launches = (
        [
            None if text == "default" else tuple(common.ints(text.replace("/", ",")))
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
    batches = common.ints(args.batches)
    model = common.build(args.shape, common.pick_device(args.device)).eval()
    vocab, length = model.config.vocab_size, args.prompt + args.decode
    for batch in batches:
        engine = common.serving_engine(model, batch, length, args.prompt)
        report(ops, "base", engine, ["base"] * batch, vocab, batch, args)
        del engine
    cache_dir = tempfile.mkdtemp()
    for rank in common.ints(args.ranks):
        config = SigmaConfig(rank=rank, target_modules=common.TARGETS, cache_dir=cache_dir)
        bank = AdapterBank.over(copy.deepcopy(model), config)
        for batch in batches:
            names = common.random_adapters(bank, batch, f"r{rank}b{batch}-")
            for fold, shape in variants:
                label = f"r{rank} A=B folded={fold} {'/'.join(map(str, shape or ())) or 'default'}"
                try:
                    with ops.decode_shape(bank, fold, shape, batch):
                        engine = common.serving_engine(bank, batch, length, args.prompt)
                        report(ops, label, engine, names, vocab, batch, args)
                except ValueError as err:  # a shared grid that does not fit on the GPU
                    print(f"{label} B={batch}: {err}", flush=True)
                finally:
                    engine = None
        del bank


if __name__ == "__main__":
    main()
