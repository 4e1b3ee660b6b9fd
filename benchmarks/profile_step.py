"""Where a training step's time goes: the top GPU kernels of one row of train_step.py, by total time.

python benchmarks/profile_step.py --shape 1.1b --method sigmatune --rank 64 [--mode eager|compiled|graphed]
    [--compile regions|model]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from train_step import MODES, WARMUP, build, runner_for, timed_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1.1b")
    parser.add_argument("--method", default="sigmatune")
    parser.add_argument("--rank", default="64")
    parser.add_argument("--tokens", default="4x1024")
    parser.add_argument("--mode", choices=MODES.values(), default="eager")
    parser.add_argument("--compile", choices=["model", "regions"], default="regions")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--saved", action="store_true", help="also list what one step saves for backward, by shape"
    )
    args = parser.parse_args()
    rank = args.rank if args.rank == "full" else int(args.rank)
    batch, length = (int(x) for x in args.tokens.split("x"))
    base = build(args.shape)
    model, _, _, _ = timed_init(base, args.method, rank)
    runner = runner_for(model, base, args.mode, args.compile == "regions")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    ids = torch.randint(0, 32000, (batch, length), device="cuda")
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step():
        if args.mode == "graphed":
            torch.compiler.cudagraph_mark_step_begin()
        runner(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(
        f"per step: cpu issues in {200 * issued:.1f} ms, gpu done in {200 * total:.1f} ms (5 steps, no sync between)"
    )
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"{args.method} r={args.rank} {args.mode}: 3 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    if args.saved:
        saved_for_backward(lambda: runner(inputs_embeds=embeds, labels=ids, use_cache=False).loss, args.top)


def saved_for_backward(forward, top: int) -> None:
    """The tensors one forward pass keeps for backward (through saved_tensors_hooks, which compiled
    regions' saved activations pass too), each storage counted once, grouped by shape and dtype."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (tuple(tensor.shape), tensor.dtype, storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    groups = defaultdict(lambda: [0, 0])
    for shape, dtype, size in storages.values():
        groups[shape, dtype][0] += 1
        groups[shape, dtype][1] += size
    total = sum(size for _, size in groups.values())
    print(f"saved for backward: {total / 2**30:.2f} GiB in {len(storages)} storages; largest groups:")
    for (shape, dtype), (count, size) in sorted(groups.items(), key=lambda g: -g[1][1])[:top]:
        print(f"  {count:4d} × {shape} {dtype}: {size / 2**30:.3f} GiB")
    loss.backward()


if __name__ == "__main__":
    main()
