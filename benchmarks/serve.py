"""Serving benchmark (../shared/BENCH.md §Serving): decode throughput of mixed-adapter batches.

    python benchmarks/serve.py [--shape 1.1b] [--batches 64,256,1024] [--ranks 16,128,full] [--static-compile 64,1024]

A Llama-shaped model with random bf16 weights; B requests of PROMPT random tokens each decode DECODE
tokens greedily, all submitted at once to the engine (serving/engine.py: slot KV cache, CUDA-graphed
decode steps), driven step by step in this process. Rows (one process; each configuration runs
untimed (twice, briefly), then TIMED times, each timed run right after one of the base engine's at the same
batch; tokens/s is the configuration's median, ratio_vs_base that over the median of the base runs beside
it — the GPU's clocks drift over minutes of load, so a base measured once at the start would not do):
- base: the engine over an untouched copy of the model (no bank, no wrapping) — the ratios' denominator;
- sigmatune: the engine over a bank of rank R (16, 128, full) with A distinct adapters (1, 16, B);
- hf-eager: the untouched model in a plain HF decode loop (DynamicCache, one forward per token);
- previous-engine: the eager engine this project served with before (previous_engine.py), A = B;
- peft-lora: PEFT LoRA r16 with `adapter_names` over A = 16 adapters, in the HF loop.
- hf-static-compile (with --static-compile): transformers' generate with a static cache, forward compiled.
Time to first token is the prefill of the whole batch (until every request has its first token); decode
tokens/s counts the tokens after it. Also: the hot-load time of one adapter from disk and the memory of
RESIDENT adapters in an r16 bank. Rows are merged into results/serve.json by (method, rank, adapters,
batch, device); facts go to results/serve_facts.json; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_file import merge_facts, merge_rows
from train_step import SHAPES, TARGETS, build, sync

from sigmatune import AdapterBank, SigmaConfig
from sigmatune.serving.engine import Engine, Request

PROMPT, DECODE, TIMED, LORA_ADAPTERS, RESIDENT = 128, 128, 2, 16, 10_000
RESULTS = Path(__file__).parent / "results" / "serve.json"
KEY = ("method", "rank", "adapters", "batch", "device")


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, PROMPT), generator=generator).tolist()


def engine_run(engine, names: list[str], vocab: int, tokens: int = DECODE) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) of one batch through an engine driven step by step;
    works for this engine and the previous one (whose loop turn is _take / _prefill / _decode)."""
    firsts, counts = [], [0]

    def emit(token, finish):
        if token is not None:
            counts[0] += 1
            if counts[0] <= len(names):
                firsts.append(time.perf_counter())

    for prompt, name in zip(prompts(len(names), vocab), names, strict=True):
        engine.submit(Request(prompt, name, tokens, emit))
    sync()
    start = time.perf_counter()
    while engine.waiting.qsize() or engine.active or getattr(engine, "prefilling", None):
        if hasattr(engine, "step"):
            engine.step()
        else:
            with torch.no_grad():
                arrived = engine._take(block=False)
                engine._prefill(arrived) if arrived else engine._decode()
    sync()
    end = time.perf_counter()
    first = max(firsts)
    return first - start, (counts[0] - len(names)) / (end - first)


def hf_run(
    model, names: list[str] | None, batch: int, vocab: int, tokens: int = DECODE
) -> tuple[float, float]:
    """(ttft s, decode tokens/s): the plain HF loop, prefill then one forward per token (DynamicCache);
    names: PEFT's adapter_names, or None."""
    ids = torch.tensor(prompts(batch, vocab), device="cuda" if torch.cuda.is_available() else "cpu")
    extra = {"adapter_names": names} if names else {}
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        first = time.perf_counter()
        cache = out.past_key_values
        for _ in range(tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
    return first - start, batch * (tokens - 1) / (time.perf_counter() - first)


def measured(run, base=None) -> tuple[float, float, float | None]:
    """run(tokens) untimed (short runs: they capture the same graphs and compile the same kernels; twice,
    as a bank's first forward learns which layers share a launch), then TIMED times, each after a timed
    run of base (a warm run of the base engine), if given: (median ttft, median tokens/s, median base
    tokens/s or None)."""
    run(4)
    run(4)
    results, beside = [], []
    for _ in range(TIMED):
        if base is not None:
            beside.append(base(DECODE)[1])
        results.append(run(DECODE))
    median = statistics.median
    return median(r[0] for r in results), median(r[1] for r in results), median(beside) if beside else None


def random_adapters(bank: AdapterBank, count: int, prefix: str, scale: float = 0.05) -> list[str]:
    names = [f"{prefix}{i}" for i in range(count)]
    generator = torch.Generator(device=bank.device).manual_seed(count)
    block = {
        name: torch.randn(count, layer.rank, generator=generator, device=layer.sigma_basis.device) * scale
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
    parser.add_argument("--ranks", default="16,128,full")
    parser.add_argument("--full-adapters", default="B", help="A for the full-rank bank (1,16,B: all three)")
    parser.add_argument("--previous", default="64,1024", help="batches for the previous-engine row")
    parser.add_argument("--peft", default="64", help="batches for the PEFT adapter_names row")
    parser.add_argument(
        "--static-compile", default="", help="batches for the hf-static-compile row (compiles for minutes)"
    )
    parser.add_argument("--resident", type=int, default=RESIDENT, help="adapters for the bank-memory figure")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    model = build(args.shape).eval()  # untouched: the base rows and the HF loop
    vocab, length = model.config.vocab_size, PROMPT + DECODE
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out, rows, bases = Path(args.out), [], {}

    def add(method, rank, adapters, batch, ttft, tps, base_tps) -> None:
        row = dict(method=method, rank=rank, adapters=adapters, batch=batch, tokens_per_s=round(tps, 1),
                   ratio_vs_base=round(tps / base_tps, 3), ttft_s=round(ttft, 4), device=device)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        merge_rows(out, [row], KEY)  # after every row: a run cut short keeps what it measured

    def beside(batch):
        """A timed run of the base engine at this batch (for the ratio of what runs next to it)."""
        return lambda n: engine_run(bases[batch], ["base"] * batch, vocab, n)

    for batch in batches:  # the base engines stay, warm, for the runs beside every configuration
        bases[batch] = Engine(model, max_batch=batch, max_len=length, prefill_tokens=batch * PROMPT)
        ttft, tps, _ = measured(beside(batch))
        add("base", 0, 0, batch, ttft, tps, tps)
        ttft, tps, base_tps = measured(lambda n, b=batch: hf_run(model, None, b, vocab, n), beside(batch))
        add("hf-eager", 0, 0, batch, ttft, tps, base_tps)
    cache_dir = tempfile.mkdtemp()
    facts = {"device": device}
    for rank in [r if r == "full" else int(r) for r in args.ranks.split(",") if r]:
        config = SigmaConfig(rank=rank, target_modules=TARGETS, cache_dir=cache_dir)
        start = time.perf_counter()
        bank = AdapterBank.over(copy.deepcopy(model), config)
        print(f"bank r={rank}: {time.perf_counter() - start:.1f} s", flush=True)
        for batch in batches:
            counts = {1, 16, batch} if rank != "full" or args.full_adapters == "1,16,B" else {batch}
            for count in sorted(counts):
                names = random_adapters(bank, count, f"r{rank}b{batch}a{count}-")
                engine = Engine(bank, max_batch=batch, max_len=length, prefill_tokens=batch * PROMPT)
                mixed = [names[i % count] for i in range(batch)]
                ttft, tps, base_tps = measured(
                    lambda n, e=engine, m=mixed: engine_run(e, m, vocab, n), beside(batch)
                )
                add("sigmatune", rank, count, batch, ttft, tps, base_tps)
                del engine
        if rank == 16:
            facts.update(hot_load_s=hot_load(bank, config))
            previous_rows(bank, args.previous, vocab, add, beside)
            random_adapters(bank, args.resident, "resident-")
            facts.update(
                resident_adapters=len(bank.rows), bank_bytes=bank.memory_bytes(), layers=len(bank.layers)
            )
        del bank
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    static_compile_rows(model, args.static_compile, vocab, add, beside)
    peft_rows(model, args.peft, vocab, add, beside)
    facts = merge_facts(out.with_name(out.stem + "_facts.json"), facts)  # a run without r16 keeps the rest
    print(markdown(rows, facts))


def previous_rows(bank: AdapterBank, batches: str, vocab: int, add, beside) -> None:
    """The eager engine served before this one (previous_engine.py), every request its own adapter."""
    from previous_engine import Engine as PreviousEngine

    for batch in [int(b) for b in batches.split(",") if b]:
        names = random_adapters(bank, batch, f"previous{batch}-")
        engine = PreviousEngine(bank, max_batch=batch)
        ttft, tps, base_tps = measured(lambda n, e=engine, m=names: engine_run(e, m, vocab, n), beside(batch))
        add("previous-engine", 16, batch, batch, ttft, tps, base_tps)


def static_compile_rows(model, batches: str, vocab: int, add, beside) -> None:
    """transformers' generate() with a static cache, its decode steps compiled (mode "reduce-overhead"), on
    the untouched model; ttft from a 1-token generate, decode tokens/s from the rest of a full one."""
    batches = [int(b) for b in batches.split(",") if b]
    if not batches:
        return
    # generate() compiles the decode steps of a static cache itself (CompileConfig: inductor, "reduce-overhead");
    # a forward compiled by hand also captures prefill, whose cache writes the next replay overwrites
    model = copy.deepcopy(model)  # (holds the compiled call: the base engines keep the untouched one)
    settings = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    for batch in batches:
        ids = torch.tensor(prompts(batch, vocab), device=next(model.parameters()).device)

        def run(tokens, ids=ids, batch=batch):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, **settings)
                sync()
                ttft = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **settings)
                sync()
            return ttft, batch * (tokens - 1) / max(time.perf_counter() - start - ttft, 1e-9)

        run(DECODE)  # compiles (and captures) for this batch and length
        ttft, tps, base_tps = measured(run, beside(batch))
        add("hf-static-compile", 0, 0, batch, ttft, tps, base_tps)


def peft_rows(model, batches: str, vocab: int, add, beside) -> None:
    """PEFT LoRA r16 over LORA_ADAPTERS adapters, mixed batches through `adapter_names`."""
    batches = [int(b) for b in batches.split(",") if b]
    if not batches:
        return
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), lora, adapter_name="l0")  # the base engines keep theirs
    for i in range(1, LORA_ADAPTERS):
        peft.add_adapter(f"l{i}", lora)
    peft.eval()
    for batch in batches:
        names = [f"l{i % LORA_ADAPTERS}" for i in range(batch)]
        ttft, tps, base_tps = measured(
            lambda n, b=batch, m=names: hf_run(peft, m, b, vocab, n), beside(batch)
        )
        add("peft-lora", 16, LORA_ADAPTERS, batch, ttft, tps, base_tps)


def hot_load(bank: AdapterBank, config: SigmaConfig) -> float:
    """Seconds to load one saved adapter (random vectors, all targets) into the serving bank."""
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
    seconds = round(time.perf_counter() - start, 4)
    bank.remove("hot")
    return seconds


def markdown(rows: list[dict], facts: dict) -> str:
    lines = [
        "| method | rank | adapters | batch | decode tokens/s | × base | time to first token s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['adapters']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['ratio_vs_base']:.3f} | {r['ttft_s']:.3f} |"
        )
    text = "\n".join(lines) + f"\n\nDevice: {facts['device']}."
    if "hot_load_s" in facts:
        text += f" Hot-load of one adapter: {facts['hot_load_s']:.3f} s."
    if "resident_adapters" in facts:
        text += (
            f" An r16 bank with {facts['resident_adapters']:,} resident adapters: "
            f"{facts['bank_bytes'] / 2**20:.0f} MiB over {facts['layers']} layers."
        )
    return text + "\n"


if __name__ == "__main__":
    main()
