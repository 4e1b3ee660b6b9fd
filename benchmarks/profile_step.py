"""Where does a training step's time go? The host's issue time against the device's, and the top kernels of one
row of train_step.py by total time (prints; writes no results file).

    python benchmarks/profile_step.py --shape 1.1b --method sigmatune --rank 64 [--mode eager|compiled|graphed]
        [--compile regions|model] [--saved]
"""

from __future__ import annotations

from collections import defaultdict

import common
import torch


def main() -> None:
    options = common.parser(__doc__)
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--method", default="sigmatune")
    options.add_argument("--rank", default="64")
    options.add_argument("--tokens", default="4x1024", help="batch x sequence length")
    options.add_argument("--mode", choices=common.MODES.values(), default="eager")
    options.add_argument("--compile", choices=["model", "regions"], default="regions")
    options.add_argument("--warmup", type=int, default=3)
    options.add_argument("--steps", type=int, default=5, help="steps timed without a sync between them")
    options.add_argument("--top", type=int, default=25)
    options.add_argument(
        "--saved", action="store_true", help="also list what one step saves for backward, by shape"
    )
    args = options.parse_args()
    rank = args.rank if args.rank == "full" else int(args.rank)
    device = common.pick_device(args.device)
    base = common.build(args.shape, device)
    model, _, _, _ = common.timed_init(base, args.method, rank)
    runner = common.runner_for(model, base, args.mode, args.compile == "regions")
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda) if params else None
    ids = torch.randint(0, base.config.vocab_size, common.batch_shape(args.tokens), device=device)
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step():
        if args.mode == "graphed":
            torch.compiler.cudagraph_mark_step_begin()
        runner(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    start, issued, done = common.timed_steps(step, args.warmup, args.steps)
    issued, total = issued - start, done - start
    print(
        f"per step: the host issues in {1000 * issued / args.steps:.1f} ms, the device is done in "
        f"{1000 * total / args.steps:.1f} ms ({args.steps} steps, no sync between)"
    )
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        common.sync()
    print(f"{args.method} r={args.rank} {args.mode}: 3 steps")
    order = "cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=order, row_limit=args.top, max_name_column_width=70))
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
