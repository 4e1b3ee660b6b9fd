"""Serving benchmark (../shared/BENCH.md §Serving): decode throughput of mixed-adapter batches.

    python benchmarks/serve.py [--shape 1.1b] [--batches 64,256,1024]

A Llama-shaped model with random bf16 weights; prompts of PROMPT tokens, DECODE tokens decoded per
request with a KV cache. For a batch of B requests using A distinct adapters (A = 1, 16, B: every
request its own adapter), decode tokens/s of the base model alone, of sigmatune (AdapterBank, r=RANK
on all 7 linear types, one gather per layer), and of PEFT LoRA r=16 with `adapter_names` (A = 16),
all in one process. Also: time to first token (the prefill of the batch), the time to hot-load one
adapter from disk, and the bank's memory with 10,000 resident adapters. Writes results/serve.json
(rows: adapters, batch, tokens_per_s, ratio_vs_base, method, device, plus ttft_s) and
results/serve_facts.json (hot-load seconds, bank bytes), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from train_step import SHAPES, TARGETS, build, sync

from sigmatune import AdapterBank, SigmaConfig

PROMPT, DECODE, RANK, LORA_ADAPTERS, RESIDENT = 128, 128, 16, 16, 10_000
RESULTS = Path(__file__).parent / "results" / "serve.json"


def decode(model, batch: int, call_kwargs: dict, vocab: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) for a batch of random prompts, greedy."""
    ids = torch.randint(0, vocab, (batch, PROMPT), device="cuda" if torch.cuda.is_available() else "cpu")
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **call_kwargs)
        sync()
        ttft = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(DECODE - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, **call_kwargs)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
    return ttft, batch * (DECODE - 1) / (time.perf_counter() - start)


def random_adapters(bank: AdapterBank, count: int, prefix: str, scale: float = 0.05) -> list[str]:
    names = [f"{prefix}{i}" for i in range(count)]
    g = torch.Generator(device=bank.device).manual_seed(count)
    block = {
        name: torch.randn(count, layer.rank, generator=g, device=layer.sigma_basis.device) * scale
        for name, layer in bank.layers.items()
    }
    bank.add_many(names, block)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="1.1b")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--resident", type=int, default=RESIDENT, help="adapters for the bank-memory figure")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    base = build(args.shape)
    vocab = base.config.vocab_size
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    config = SigmaConfig(rank=RANK, target_modules=TARGETS, cache_dir=tempfile.mkdtemp())
    bank = AdapterBank.over(base, config)
    rows, base_tps = [], {}
    for batch in batches:
        ttft, base_tps[batch] = decode(base, batch, {}, vocab)
        rows.append(row("base", 0, batch, base_tps[batch], 1.0, ttft, device))
        for count in sorted({1, 16, batch}):
            names = random_adapters(bank, count, f"b{batch}a{count}-")
            with bank.serving(bank.ids([names[i % count] for i in range(batch)])):
                ttft, tps = decode(base, batch, {}, vocab)
            rows.append(row("sigmatune", count, batch, tps, tps / base_tps[batch], ttft, device))
    facts = {"hot_load_s": hot_load(bank, config), "device": device}
    random_adapters(bank, args.resident, "resident-")
    facts.update(
        resident_adapters=len(bank.rows), bank_bytes=bank.memory_bytes(), bank_layers=len(bank.layers)
    )
    rows += lora_rows(bank.model.unload(), batches, vocab, device, base_tps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    out.with_name(out.stem + "_facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(markdown(rows, facts))


def row(method, adapters, batch, tps, ratio, ttft, device) -> dict:
    return dict(
        adapters=adapters, batch=batch, tokens_per_s=round(tps, 1), ratio_vs_base=round(ratio, 3),
        method=method, device=device, ttft_s=round(ttft, 4),
    )  # fmt: skip


def hot_load(bank: AdapterBank, config: SigmaConfig) -> float:
    """Seconds to load one saved adapter (random vectors, r=RANK, all targets) into the serving bank."""
    model = bank.model
    model.add_adapter("hot", config)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.sigma_adapters["hot"].vector.normal_(0, 0.05)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder, selected_adapters=["hot"])
    model.delete_adapter("hot")
    sync()
    start = time.perf_counter()
    bank.load("hot", Path(folder) / "hot")
    sync()
    return round(time.perf_counter() - start, 4)


def lora_rows(base, batches: list[int], vocab: int, device: str, base_tps: dict) -> list[dict]:
    """PEFT LoRA r=16, LORA_ADAPTERS adapters, mixed batches through `adapter_names`."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="l0")
    for i in range(1, LORA_ADAPTERS):
        model.add_adapter(f"l{i}", lora)
    model.eval()
    rows = []
    for batch in batches:
        names = [f"l{i % LORA_ADAPTERS}" for i in range(batch)]
        ttft, tps = decode(model, batch, {"adapter_names": names}, vocab)
        rows.append(
            row("peft-lora-adapter_names", LORA_ADAPTERS, batch, tps, tps / base_tps[batch], ttft, device)
        )
    return rows


def markdown(rows: list[dict], facts: dict) -> str:
    lines = [
        "| method | adapters | batch | decode tokens/s | × base | time to first token s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['adapters']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['ratio_vs_base']:.3f} | {r['ttft_s']:.3f} |"
        )
    return "\n".join(lines) + (
        f"\n\nHot-load of one adapter: {facts['hot_load_s']:.3f} s. Bank with {facts['resident_adapters']:,} resident "
        f"adapters: {facts['bank_bytes'] / 2**20:.0f} MiB over {facts['bank_layers']} layers. Device: {facts['device']}.\n"
    )


if __name__ == "__main__":
    main()
