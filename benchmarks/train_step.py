"""Training-step benchmark (../shared/BENCH.md): one process per model shape, every row in one run.

    python benchmarks/train_step.py --shape 1.1b [--tokens 4x1024] [--rows all|eager|compiled|graphed|...] [--rounds N]

A Llama-shaped model with random bf16 weights; targets: all 7 linear types. Rows: the frozen model
(no trainable weights, input gradients on), sigmatune r=16, 64, full (and its band structure as method
sigmatune-band<b>, e.g. --rows sigmatune-band1:full,sigmatune-band4:64; sigmatune-fn: the full spectrum
through fused_linear's one-node Function in eager mode instead of torch ops, fused_linear.EAGER_OPS off),
PEFT LoRA r=16 (alpha 32),
eigentune 0.2.0 r=16/64 (backends torch and auto), each in a mode (`mode` in the results):
  eager      the model as it is (the HF Trainer's default)
  compiled   torch.compile(fullgraph=True): each decoder layer its own region (--compile regions, the
             default: one compile serves all 22), or the whole model (--compile model)
  graphed    the whole model compiled with mode="reduce-overhead": forward and backward replayed as CUDA
             graphs
A row spec is method:rank[:e|c|g] (e by default). Per row: init seconds (cold, and warm from the basis
cache), trainable parameters, seconds to the end of the first step (compile included), median step ms over
TIMED steps after WARMUP (synchronised around each; with --rounds N the rows are measured round-robin N
times and the median is over every round's steps, `rounds` listing each round's median: an eager step is
bound by the host, whose speed drifts), ratio to the frozen step of the same mode, peak allocated GiB and
its ratio. Rows go into benchmarks/results/train_step.json (merged by key) and a
markdown table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_file import merge_rows
from transformers import LlamaConfig, LlamaForCausalLM

# shape → (hidden, intermediate, layers, attention heads, key/value heads); "tiny" checks the script itself
SHAPES = {"1.1b": (2048, 5632, 22, 32, 4), "7b": (4096, 11008, 32, 32, 32), "tiny": (64, 160, 2, 4, 2)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 3, 7
torch._dynamo.config.recompile_limit = 64  # one compiled region per decoder layer may specialise per layer
RESULTS = Path(__file__).parent / "results" / "train_step.json"
TABLE = Path(__file__).parent / "README.md"
MODES = {"e": "eager", "c": "compiled", "g": "graphed"}


def row_key(row: dict) -> tuple:
    """What one row measures (rows of other GPUs are kept); rows from before `mode` read it from `compiled`."""
    mode = row.get("mode") or ("compiled" if row["compiled"] else "eager")
    return row["shape"], row["method"], str(row["rank"]), mode, row["tokens"], row["device"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(shape: str) -> LlamaForCausalLM:
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.requires_grad_(False)


def wrap(base, method: str, rank, cache: str):
    """(model to train, unwrap function) for one row."""
    if method == "frozen":
        return base, lambda: base
    if method == "sigmatune" or method.startswith("sigmatune-band") or method == "sigmatune-fn":
        from sigmatune import SigmaConfig, get_sigma_model
        from sigmatune.core import fused_linear

        band = structure_of(method)["band"]
        structure = dict(structure="band", band=band) if band else {}
        config = SigmaConfig(rank=rank, target_modules=TARGETS, cache_dir=cache, **structure)
        model = get_sigma_model(base, config, progress=False)
        previous, fused_linear.EAGER_OPS = fused_linear.EAGER_OPS, method != "sigmatune-fn"

        def unwrap():
            fused_linear.EAGER_OPS = previous
            return model.unload()

        return model, unwrap
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        )
        return model, model.unload
    if method.startswith("eigentune-"):
        import eigentune

        backend = method.removeprefix("eigentune-")
        config = eigentune.EigenTuneConfig(
            rank=rank, target_modules=TARGETS, backend=backend, cache_dir=cache
        )
        model = eigentune.get_eigentune_model(base, config)
        return model, lambda: eigentune.unload(model)
    raise ValueError(method)


def timed_init(base, method, rank) -> tuple[object, object, float, float | None]:
    """Wrap cold (empty basis cache), unwrap, wrap again warm; returns the warm model and both times."""
    cache = tempfile.mkdtemp(prefix="bases-")
    gc.collect()  # an earlier row's compile leaves garbage whose collection would land in this timing
    sync()
    start = time.perf_counter()
    model, unwrap = wrap(base, method, rank, cache)
    sync()
    cold = time.perf_counter() - start
    if method in ("frozen", "lora"):
        return model, unwrap, cold, None
    unwrap()
    gc.collect()
    sync()
    start = time.perf_counter()
    model, unwrap = wrap(base, method, rank, cache)
    sync()
    return model, unwrap, cold, time.perf_counter() - start


def decoder_layers(base) -> list:
    return list(base.model.layers)


def runner_for(model, base, mode: str, regions: bool):
    """What a step calls: the model itself (eager), or compiled — each decoder layer its own region, or the
    whole model; graphed rows always compile the whole model (one CUDA graph replayed per region would
    overwrite the outputs the next region reads)."""
    if mode == "eager":
        return model
    if mode == "compiled" and regions:
        for layer in decoder_layers(base):
            layer.compile(fullgraph=True)
        return model
    return torch.compile(model, fullgraph=True, mode="reduce-overhead" if mode == "graphed" else None)


def uncompile(base) -> None:
    for layer in decoder_layers(base):
        layer._compiled_call_impl = None
    torch._dynamo.reset()


def measure(model, base, mode: str, regions: bool, batch: int, length: int) -> tuple[list, float, float]:
    """(timed step ms, peak allocated GiB, seconds to the end of the first step) of forward + backward +
    optimizer step (fused AdamW)."""
    runner = runner_for(model, base, mode, regions)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=DEVICE == "cuda") if params else None
    ids = torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # input gradients on: the embeddings' output requires grad, so backward runs through every layer
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, first = [], float("nan")
    for step in range(WARMUP + TIMED):
        sync()
        start = time.perf_counter()
        if mode == "graphed":  # a new iteration: the graphs' outputs of the last one are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        loss = runner(inputs_embeds=embeds, labels=ids, use_cache=False).loss
        loss.backward()
        embeds.grad = None  # each step its own input gradient (a graph's output is not accumulated into)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= WARMUP:
            times.append(1000 * (time.perf_counter() - start))
        elif step == 0:
            first = time.perf_counter() - start
            print(f"  first step (compile included): {first:.1f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    uncompile(base)
    return times, peak, first


def rows_for(which: str) -> list[tuple[str, object, str]]:
    """(method, rank, mode) for `all`, one mode's name, or a list of method:rank[:e|c|g]."""
    common = [("frozen", 0), ("sigmatune", 16), ("sigmatune", 64), ("sigmatune", "full"), ("lora", 16)]
    common += [("sigmatune-band1", "full"), ("sigmatune-band4", 64)]
    peers = [(f"eigentune-{b}", r) for b in ("torch", "auto") for r in (16, 64)]
    if which in ("all", *MODES.values()):
        modes = list(MODES.values()) if which == "all" else [which]
        return [(m, r, mode) for mode in modes for m, r in common + (peers if mode == "eager" else [])]
    rows = []
    for spec in which.split(","):
        method, rank, *mode = spec.split(":")
        rows.append((method, rank if rank == "full" else int(rank), MODES[mode[0] if mode else "e"]))
    return rows


def structure_of(method: str) -> dict:
    """The structure keys of a sigmatune row (none for the other methods)."""
    if method in ("sigmatune", "sigmatune-fn"):
        return dict(structure="diagonal", band=0)
    if method.startswith("sigmatune-band"):
        return dict(structure="band", band=int(method.removeprefix("sigmatune-band")))
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="1.1b")
    parser.add_argument("--tokens", default="4x1024", help="batch x sequence length")
    parser.add_argument(
        "--rows",
        default="all",
        help="all, eager, compiled, graphed, or method:rank[:e|c|g],... (eager, compiled, graphed)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="results JSON to merge the rows into")
    parser.add_argument(
        "--compile", choices=["model", "regions"], default="regions", help="what compiled rows compile"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the rows round-robin this many times (step ms: the "
        "median of every round's timed steps; `rounds` lists each round's median)",
    )
    parser.add_argument(
        "--table-from", metavar="JSON", help="only rewrite the README table from this results file"
    )
    args = parser.parse_args()
    if args.table_from:
        write_table(markdown(json.loads(Path(args.table_from).read_text())))
        return
    batch, length = (int(x) for x in args.tokens.split("x"))
    rows = rows_for(args.rows)
    base = build(args.shape)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    measured = {}  # (method, rank, mode) → what its rounds gave
    order = list(MODES.values())
    ordered = sorted(rows, key=lambda r: (order.index(r[2]), r[0] != "frozen"))
    for turn in range(args.rounds):  # round-robin: a slow spell of the host falls on every row alike
        for method, rank, mode in ordered:
            unwrap = None
            try:
                model, unwrap, init_s, init_warm_s = timed_init(base, method, rank)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                times, peak, first_s = measure(model, base, mode, args.compile == "regions", batch, length)
            except Exception as err:  # a failing peer must not lose the other rows
                print(f"{method} r={rank} {mode}: FAILED {type(err).__name__}: {err}"[:2000], flush=True)
                continue
            finally:
                if unwrap is not None:
                    unwrap()
            entry = measured.setdefault(
                (method, rank, mode), dict(init=(init_s, init_warm_s), trainable=trainable, first=first_s)
            )
            entry.setdefault("times", []).extend(times)
            entry.setdefault("rounds", []).append(statistics.median(times))
            entry["peak"] = max(entry.get("peak", peak), peak)
            print(f"{method} r={rank} {mode} round {turn + 1}: {statistics.median(times):.2f} ms", flush=True)
            # nothing measured is lost if the run is cut short (a time limit): the rows so far, merged in
            merge_rows(Path(args.out), rows_of(measured, args, batch, length, device), row_key)
    results = rows_of(measured, args, batch, length, device)
    for row in results:
        print(json.dumps(row), flush=True)
    save(results, Path(args.out))


def rows_of(measured: dict, args, batch: int, length: int, device: str) -> list[dict]:
    """The results rows of what has been measured so far (ratios to the frozen row of the same mode)."""
    results = []
    for (method, rank, mode), entry in measured.items():
        step_ms, peak = statistics.median(entry["times"]), entry["peak"]
        frozen = measured.get(("frozen", 0, mode))
        ref_ms = statistics.median(frozen["times"]) if frozen else float("nan")
        ref_peak = frozen["peak"] if frozen else float("nan")
        init_s, init_warm_s = entry["init"]
        row = dict(
            shape=args.shape, method=method, rank=rank, compiled=mode != "eager", mode=mode,
            **structure_of(method), tokens=batch * length,
            init_s=round(init_s, 3), init_warm_s=None if init_warm_s is None else round(init_warm_s, 3),
            trainable=entry["trainable"], first_step_s=round(entry["first"], 1), step_ms=round(step_ms, 2),
            ratio_vs_frozen=round(step_ms / ref_ms, 3), peak_gib=round(peak, 2),
            peak_ratio_vs_frozen=round(peak / ref_peak, 3), device=device,
            compile={"eager": None, "compiled": args.compile, "graphed": "model"}[mode],
            rounds=[round(ms, 2) for ms in entry["rounds"]],
        )  # fmt: skip
        results.append(row)
    return results


def save(rows: list[dict], path: Path) -> None:
    """Merge rows into the results file (same key: replaced), then print the table."""
    print(markdown(merge_rows(path, rows, row_key)))


def markdown(rows: list[dict]) -> str:
    head = "| device | shape | tokens | method | rank | mode | init s (warm) | trainable | step ms | × frozen | peak GiB | × frozen |"
    lines = [head, "|" + "---|" * 12]
    order = list(MODES.values())
    for r in sorted(rows, key=lambda r: (*row_key(r)[4:], r["shape"], order.index(row_key(r)[3]), r["method"] != "frozen", r["method"], str(r["rank"]))):  # fmt: skip
        warm = "" if r["init_warm_s"] is None else f" ({r['init_warm_s']:.2f})"
        lines.append(
            f"| {r['device'].removeprefix('NVIDIA ')} | {r['shape']} | {r['tokens']} | {r['method']} | {r['rank']} | "
            f"{row_key(r)[3]} | {r['init_s']:.2f}{warm} | {r['trainable']:,} | {r['step_ms']:.1f} | "
            f"{r['ratio_vs_frozen']:.2f} | {r['peak_gib']:.2f} | {r['peak_ratio_vs_frozen']:.3f} |"
        )
    return (
        "\n".join(lines)
        + "\n\nEach ratio is to the frozen row of the same device, shape and mode measured in the"
        " same process; the frozen rows shown are from the last process that measured them.\n"
    )


def write_table(table: str) -> None:
    start, end = "<!-- train_step table -->", "<!-- /train_step table -->"
    text = TABLE.read_text() if TABLE.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    before, _, rest = text.partition(start)
    _, _, after = rest.partition(end)
    TABLE.write_text(f"{before}{start}\n{table}{end}{after}")


if __name__ == "__main__":
    main()
