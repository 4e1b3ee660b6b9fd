"""Train a sigmatune adapter with DDP or FSDP2 on several processes (or one, as the reference).

    torchrun --nproc-per-node 2 examples/distributed_train.py --mode ddp
    torchrun --nproc-per-node 2 examples/distributed_train.py --mode fsdp2 --dtype bfloat16
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_train.py --mode ddp
    python examples/distributed_train.py                    # one process, the same global batches
    ... --resume ADAPTER                                    # continue from a saved adapter
    ... --adapters 3                                        # 3 adapters trained together (example i: i mod 3)

Every rank builds the same model; the SVD bases are computed once on rank 0 and broadcast. Each step
takes a global batch (the same examples whatever the number of processes), each rank its slice, in
--accumulate micro-batches. The loss is the mean over the global batch's answer tokens, so N
processes train exactly what one process trains. Every rank calls save_pretrained; rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from sigmatune import RowsAdamW, SigmaConfig, SigmaModel, Together, get_sigma_model
from sigmatune.hub.loading import load_model
from sigmatune.training.data import load_task
from sigmatune.training.distributed import distribute, gradient_sync, leave, split
from sigmatune.training.evaluate import token_loss
from sigmatune.training.loop import batch_order
from sigmatune.training.rows_adamw import clip_rows
from sigmatune.training.tokens import collate, encode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="bigbench:qa_wikidata")
    parser.add_argument("--rank", default="16", help="singular values per layer, or 'full'")
    parser.add_argument(
        "--band", type=int, default=0, help="train a band of this half-width (0: the diagonal)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16, help="examples per step, over all processes")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per process per step")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 for mixed precision")
    parser.add_argument("--output", default="sigmatune-distributed")
    parser.add_argument("--resume", help="start from a saved adapter (written by any number of processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", type=int, default=0, help="train this many adapters together (0: one)")
    args = parser.parse_args()

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
            timeout=datetime.timedelta(minutes=5),  # a peer that never arrives fails the job, not hangs it
        )
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, torch.float32, device)
    task = load_task(args.data, heldout=min(200, 8), seed=args.seed)
    examples = [encode(tokenizer, task.instruction, e, 128) for e in task.train]
    rank_setting = args.rank if args.rank == "full" else int(args.rank)
    if args.resume:  # loaded whole on every rank, before any sharding
        sigma = SigmaModel.from_pretrained(model, args.resume, is_trainable=True)
    else:  # the SVD runs on rank 0 and is broadcast
        structure = dict(structure="band", band=args.band) if args.band else {}
        config = SigmaConfig(rank=rank_setting, **structure)
        sigma = get_sigma_model(model, config, "a0" if args.adapters else "default", progress=rank == 0)
        for k in range(1, args.adapters):
            sigma.add_adapter(f"a{k}", config)
    report_bases(sigma, world, rank)
    together = Together(sigma, [f"a{k}" for k in range(args.adapters)]).__enter__() if args.adapters else None
    runner = distribute(sigma, args.mode, world, args.dtype, device)
    params = [p for p in sigma.parameters() if p.requires_grad]
    if together is None:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    else:
        optimizer = RowsAdamW(params, torch.full((args.adapters,), args.lr))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16" and args.mode == "ddp"
        else contextlib.nullcontext()
    )
    for step, indices in enumerate(batch_order(len(examples), args.global_batch, args.steps, args.seed), 1):
        tokens = sum(
            sum(label != -100 for label in examples[i].labels[1:]) for i in indices
        )  # whole global batch
        chunks = [c for c in split(indices[rank::world], args.accumulate)]
        total = 0.0
        for number, chunk in enumerate(chunks, 1):
            last = number == len(chunks)
            with gradient_sync(runner, args.mode, last, world), autocast:
                batch = {
                    k: v.to(device)
                    for k, v in collate([examples[i] for i in chunk], tokenizer.pad_token_id).items()
                }
                if together is not None:  # example i trains adapter i mod K, whichever rank holds it
                    together.rows(torch.tensor([i % args.adapters for i in chunk], device=device))
                mean, count = token_loss(runner, batch)
                loss = mean * count / tokens * world  # ranks average gradients: × world gives the global mean
                loss.backward()
                total += float(loss.detach()) / world
        if together is not None:
            clip_rows(params, 1.0)  # each adapter clipped by its own gradient norm (rows sharded under FSDP2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # each rank holds its share of the global mean
            total = torch.tensor(total, device=device)
            dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {float(total):.4f}", flush=True)
    if together is not None:
        together.__exit__(None, None, None)  # each adapter its own vectors again
    sigma.save_pretrained(args.output)  # every rank gathers its shards; rank 0 writes
    if world > 1:
        leave()  # barrier, destroy the process group, exit without destructors (they can hang: see leave)


def report_bases(sigma, world: int, rank: int) -> None:
    """Check that every rank holds the same bases (a hash of rank 0's and each rank's)."""
    digest = hashlib.sha256()
    for name, layer in sorted(sigma.spectral_layers().items()):
        digest.update(name.encode() + layer.sigma_basis.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()[:16]
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if rank == 0:
        print(
            f"bases {'identical' if len(set(everyone)) == 1 else 'DIFFERENT'} on {world} processes: {everyone[0]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
