"""What decode throughput does the serving engine reach on mixed-adapter batches, against the engine over an
untouched model (and against a plain HF decode loop and PEFT's mixed batches)?

    python benchmarks/serve.py [--shape 1.1b] [--batches 64,256,1024] [--ranks 16,128,full] [--static-compile 64,1024]

A Llama-shaped model with random bf16 weights; B requests of --prompt random tokens each decode --decode
tokens greedily, all submitted at once to the engine (serving/engine.py: slot KV cache, CUDA-graphed
decode steps), driven step by step in this process. Rows (one process; each configuration runs
untimed (twice, briefly), then --timed times, each timed run right after one of the base engine's at the same
batch; tokens/s is the configuration's median, ratio_vs_base that over the median of the base runs beside
it — the GPU's clocks drift over minutes of load, so a base measured once at the start would not do):
- base: the engine over an untouched copy of the model (no bank, no wrapping) — the ratios' denominator;
- sigmatune: the engine over a bank of rank R (16, 128, full) with A distinct adapters (1, 16, B);
- hf-eager: the untouched model in a plain HF decode loop (DynamicCache, one forward per token);
- peft-lora: PEFT LoRA r16 with `adapter_names` over A = 16 adapters, in the HF loop;
- hf-static-compile (with --static-compile): transformers' generate with a static cache, forward compiled.
Time to first token is the prefill of the whole batch (until every request has its first token); decode
tokens/s counts the tokens after it. Also: the hot-load time of one adapter from disk and the memory of
--resident adapters in an r16 bank. Rows are merged into results/serve.json by (method, rank, adapters,
batch, device); the facts go to results/serve_facts.json (beside --out); a markdown table is printed.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

from sigmatune import AdapterBank, SigmaConfig

LORA_ADAPTERS = 16
KEY = ("method", "rank", "adapters", "batch", "device")


def hf_run(model, names: list[str] | None, batch: int, prompt: int, tokens: int) -> tuple[float, float]:
    """(ttft s, decode tokens/s): the plain HF loop, prefill then one forward per token (DynamicCache);
    names: PEFT's adapter_names, or None."""
    ids = torch.tensor(common.prompts(batch, prompt, model.config.vocab_size), device=model.device)
    extra = {"adapter_names": names} if names else {}
    common.sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        common.sync()
        first = time.perf_counter()
        cache = out.past_key_values
        for _ in range(tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        common.sync()
    return first - start, batch * (tokens - 1) / (time.perf_counter() - first)


def measured(run, args, base=None) -> tuple[float, float, float | None]:
    """run(tokens) untimed (short runs: they capture the same graphs and compile the same kernels; twice,
    as a bank's first forward learns which layers share a launch), then --timed times, each after a timed
    run of base (a warm run of the base engine), if given: (median ttft, median tokens/s, median base
    tokens/s or None)."""
    run(4)
    run(4)
    results, beside = [], []
    for _ in range(args.timed):
        if base is not None:
            beside.append(base(args.decode)[1])
        results.append(run(args.decode))
    median = statistics.median
    return median(r[0] for r in results), median(r[1] for r in results), median(beside) if beside else None


def main() -> None:
    options = common.parser(__doc__, out="serve.json")
    options.add_argument("--shape", choices=common.SHAPES, default="1.1b")
    options.add_argument("--batches", default="64,256,1024")
    options.add_argument("--ranks", default="16,128,full")
    options.add_argument("--full-adapters", default="B", help="A for the full-rank bank (1,16,B: all three)")
    options.add_argument("--peft", default="64", help="batches for the PEFT adapter_names row")
    options.add_argument(
        "--static-compile", default="", help="batches for the hf-static-compile row (compiles for minutes)"
    )
    options.add_argument("--resident", type=int, default=10_000, help="adapters for the bank-memory figure")
    options.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    options.add_argument("--decode", type=int, default=128, help="tokens decoded per request")
    options.add_argument("--timed", type=int, default=2, help="timed runs per configuration")
    args = options.parse_args()
    batches = common.ints(args.batches)
    device = common.pick_device(args.device)
    model = common.build(args.shape, device).eval()  # untouched: the base rows and the HF loop
    vocab, length = model.config.vocab_size, args.prompt + args.decode
    rows, bases = [], {}

    def add(method, rank, adapters, batch, ttft, tps, base_tps) -> None:
        row = dict(method=method, rank=rank, adapters=adapters, batch=batch, tokens_per_s=round(tps, 1),
                   ratio_vs_base=round(tps / base_tps, 3), ttft_s=round(ttft, 4), device=common.device_name(device))  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        common.merge_rows(args.out, [row], KEY)  # after every row: a run cut short keeps what it measured

    def run(engine, names):
        return lambda n: common.engine_run(engine, names, vocab, args.prompt, n)

    def beside(batch):
        """A timed run of the base engine at this batch (for the ratio of what runs next to it)."""
        return run(bases[batch], ["base"] * batch)

    for batch in batches:  # the base engines stay, warm, for the runs beside every configuration
        bases[batch] = common.serving_engine(model, batch, length, args.prompt)
        ttft, tps, _ = measured(beside(batch), args)
        add("base", 0, 0, batch, ttft, tps, tps)
        hf = lambda n, b=batch: hf_run(model, None, b, args.prompt, n)  # noqa: E731
        add("hf-eager", 0, 0, batch, *measured(hf, args, beside(batch)))
    cache_dir = tempfile.mkdtemp()
    facts = {"device": common.device_name(device)}
    for rank in [r if r == "full" else int(r) for r in args.ranks.split(",") if r]:
        config = SigmaConfig(rank=rank, target_modules=common.TARGETS, cache_dir=cache_dir)
        start = time.perf_counter()
        bank = AdapterBank.over(copy.deepcopy(model), config)
        print(f"bank r={rank}: {time.perf_counter() - start:.1f} s", flush=True)
        for batch in batches:
            counts = {1, 16, batch} if rank != "full" or args.full_adapters == "1,16,B" else {batch}
            for count in sorted(counts):
                names = common.random_adapters(bank, count, f"r{rank}b{batch}a{count}-")
                engine = common.serving_engine(bank, batch, length, args.prompt)
                mixed = [names[i % count] for i in range(batch)]
                add("sigmatune", rank, count, batch, *measured(run(engine, mixed), args, beside(batch)))
                del engine
        if rank == 16:
            facts.update(hot_load_s=hot_load(bank, config))
            common.random_adapters(bank, args.resident, "resident-")
            facts.update(
                resident_adapters=len(bank.rows), bank_bytes=bank.memory_bytes(), layers=len(bank.layers)
            )
        del bank
        torch.cuda.empty_cache() if device.type == "cuda" else None
    static_compile_rows(model, common.ints(args.static_compile), args, add, beside)
    peft_rows(model, common.ints(args.peft), args, add, beside)
    facts_file = args.out.with_name(args.out.stem + "_facts.json")  # results/serve_facts.json
    facts = common.merge_facts(facts_file, facts)  # a run without r16 keeps the facts it did not measure
    print(markdown(rows, facts))


def static_compile_rows(model, batches: list[int], args, add, beside) -> None:
    """transformers' generate() with a static cache, its decode steps compiled (mode "reduce-overhead"), on
    the untouched model; ttft from a 1-token generate, decode tokens/s from the rest of a full one."""
    if not batches:
        return
    # generate() compiles the decode steps of a static cache itself (CompileConfig: inductor, "reduce-overhead");
    # a forward compiled by hand also captures prefill, whose cache writes the next replay overwrites
    model = copy.deepcopy(model)  # (holds the compiled call: the base engines keep the untouched one)
    settings = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    for batch in batches:
        ids = torch.tensor(common.prompts(batch, args.prompt, model.config.vocab_size), device=model.device)

        def run(tokens, ids=ids, batch=batch):
            common.sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, **settings)
                common.sync()
                ttft = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **settings)
                common.sync()
            return ttft, batch * (tokens - 1) / max(time.perf_counter() - start - ttft, 1e-9)

        run(args.decode)  # compiles (and captures) for this batch and length
        add("hf-static-compile", 0, 0, batch, *measured(run, args, beside(batch)))


def peft_rows(model, batches: list[int], args, add, beside) -> None:
    """PEFT LoRA r16 over LORA_ADAPTERS adapters, mixed batches through `adapter_names`."""
    if not batches:
        return
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=common.TARGETS, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), lora, adapter_name="l0")  # the base engines keep theirs
    for i in range(1, LORA_ADAPTERS):
        peft.add_adapter(f"l{i}", lora)
    peft.eval()
    for batch in batches:
        names = [f"l{i % LORA_ADAPTERS}" for i in range(batch)]
        hf = lambda n, b=batch, m=names: hf_run(peft, m, b, args.prompt, n)  # noqa: E731
        add("peft-lora", 16, LORA_ADAPTERS, batch, *measured(hf, args, beside(batch)))


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
    common.sync()
    start = time.perf_counter()
    bank.load("hot", Path(folder) / "hot")
    common.sync()
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
