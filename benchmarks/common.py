"""What the benchmark scripts share: model shapes, a Llama with random weights, the device, timing with CUDA
synchronisation, the results files; a training step's rows (train_step, profile_step, quantized) and the
serving engine's runs (serve, profile_serve).

Each script answers one question (README.md), merges its rows into results/<script>.json (or --out) and takes
arguments small enough for a CPU run of a few seconds (tests/test_benchmarks.py runs every script so).
Speed claims are ratios measured side by side in one process on one GPU: a CPU timing proves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).parent / "results"
# shape → (hidden, intermediate, layers, attention heads, key/value heads, vocabulary) of a Llama; "tiny" checks
# a script on a CPU
SHAPES = {
    "1.1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "135m": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M's shape (the default job's model)
    "tiny": (64, 160, 2, 4, 2, 512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all 7 linear types


@functools.cache
def internals() -> SimpleNamespace:
    """The sigmatune internals common.py uses, in one place."""
    from sigmatune.serving.engine import Engine, Request

    return SimpleNamespace(Engine=Engine, Request=Request)


# ---- arguments, device ------------------------------------------------------------------------------------


def parser(description: str, out: str | None = None) -> argparse.ArgumentParser:
    """A script's parser (its docstring as help) with --device, and --out when it writes a results file."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto: cuda where there is one")
    if out is not None:
        parser.add_argument("--out", type=Path, default=RESULTS / out, help="the results file (JSON)")
    return parser


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def device_name(device: torch.device | str) -> str:
    """The GPU's name ("NVIDIA H200"), or "cpu": the `device` of every results row."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync() -> None:
    """Wait for the GPU's queued work (a timing's start and end); nothing on a CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ints(text: str) -> list[int]:
    """The integers of a comma-separated list: "64,256,1024" → [64, 256, 1024], "" → []."""
    return [int(v) for v in text.split(",") if v]


def batch_shape(text: str) -> tuple[int, int]:
    """(batch, sequence length) of "4x1024"."""
    batch, length = (int(v) for v in text.split("x"))
    return batch, length


# ---- models -----------------------------------------------------------------------------------------------


def build(shape: str, device: torch.device | str):
    """A LlamaForCausalLM of the shape, random bf16 weights (seed 0), frozen, on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=4096,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.requires_grad_(False)


def weight_shapes(shape: str) -> list[tuple[int, int, int]]:
    """(out, in, layers of that shape) of the 7 linear types of the shape's decoder layers."""
    hidden, intermediate, layers, heads, kv_heads, _ = SHAPES[shape]
    kv = hidden // heads * kv_heads
    counts: dict[tuple[int, int], int] = {}
    for out_in, per_layer in [((hidden, hidden), 2), ((kv, hidden), 2), ((intermediate, hidden), 2)]:
        counts[out_in] = counts.get(out_in, 0) + per_layer * layers  # q, o; k, v; gate, up
    counts[(hidden, intermediate)] = layers  # down
    return [(out, inp, count) for (out, inp), count in counts.items()]


def worker_env(base: dict | None = None, **values: str) -> dict:
    """The environment of a worker process sharing the GPU with others: base (default os.environ) with
    expandable CUDA segments unless base sets the allocator (each process holds back less memory), and values."""
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **(base or os.environ), **values}


@contextlib.contextmanager
def mps_daemon():
    """An MPS control daemon of our own while the block runs (its pipe and log folders in a temp folder, so
    nothing else on the machine talks to it; the GPU's settings are left alone): yields the environment its
    clients need (CUDA_MPS_PIPE_DIRECTORY...), or None, with a line saying why, where there is none."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        print("no nvidia-cuda-mps-control on this machine: no MPS", flush=True)
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mps-") as folder:
        env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": folder + "/pipe",
            "CUDA_MPS_LOG_DIRECTORY": folder + "/log",
        }
        for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            os.makedirs(env[key])
        started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True)
        if started.returncode:
            print(f"MPS did not start: {(started.stderr or started.stdout).strip()}", flush=True)
            yield None
            return
        try:
            yield env
        finally:
            subprocess.run([control], input="quit\n", env=env, text=True, capture_output=True)


# ---- timing -----------------------------------------------------------------------------------------------

CYCLES_PER_S = 1.98e9  # the H200's boost clock: torch.cuda._sleep counts cycles


def host_and_gpu_us(
    fn: Callable[[], object], device: torch.device, calls: int, repeats: int, sleep_ms: float = 150
):
    """(host µs, GPU µs) per call: the least of `repeats` rounds of `calls` calls after as many untimed ones
    (at most 10). On a GPU each round first queues a sleep of sleep_ms, so the calls only queue while the host
    issues them: host µs is the host's cost alone, GPU µs the time from the sleep's end to the last call's end
    (the calls back to back) over the calls. On a CPU both are the wall time per call."""
    for _ in range(min(calls, 10)):
        fn()
    cuda = device.type == "cuda"
    host, gpu = [], []
    for _ in range(repeats):
        sync()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(sleep_ms * 1e-3 * CYCLES_PER_S))
            begin.record()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter() - start
        host.append(1e6 * issued / calls)
        if not cuda:
            gpu.append(host[-1])
            continue
        end.record()
        torch.cuda.synchronize()
        if 1e3 * issued > 0.8 * sleep_ms:
            print(f"  (issuing took {1e3 * issued:.0f} ms, as long as the sleep: GPU µs includes idle time)")
        gpu.append(1e3 * begin.elapsed_time(end) / calls)
    return min(host), min(gpu)


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """GPU ms per replay of a captured CUDA graph: one untimed replay, then `replays` between CUDA events."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def timed_steps(step: Callable[[], object], warmup: int, steps: int) -> tuple[float, float, float]:
    """Wall-clock times (time.time()) of `steps` calls after `warmup` untimed ones: (start, the host done
    issuing them, the device done with them)."""
    for _ in range(warmup):
        step()
    sync()
    start = time.time()
    for _ in range(steps):
        step()
    issued = time.time()
    sync()
    return start, issued, time.time()


def warm_seconds(fn: Callable[[], object]) -> float:
    """Seconds of fn's second call (the first sets up: cuSOLVER's handles, kernels compiled)."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ---- results files ------------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def merge_rows(path: Path, rows: list[dict], key: tuple[str, ...] | Callable[[dict], tuple]) -> list[dict]:
    """Rows merged into the file (an earlier row with the same key values is replaced; a missing key reads
    as None; or key(row) gives the values), written atomically: a run cut short leaves the old file or the
    new one. Call it after every row, so that a run stopped by a time limit keeps what it measured."""
    values = key if callable(key) else lambda r: tuple(r.get(k) for k in key)
    keys = {values(r) for r in rows}
    merged = [r for r in load_rows(path) if values(r) not in keys] + rows
    write_json(path, merged)
    return merged


def merge_facts(path: Path, facts: dict) -> dict:
    """A JSON object of facts updated with these (the keys a run did not measure keep their values)."""
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **facts}
    write_json(path, merged)
    return merged


def write_json(path: Path, value) -> None:
    """Written to a temp file and renamed over path: a run cut short leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)


# ---- a training step (train_step, profile_step, quantized) ------------------------------------------------

MODES = {"e": "eager", "c": "compiled", "g": "graphed"}


def structure_of(method: str) -> dict:
    """The structure keys of a sigmatune row (sigmatune, sigmatune-band<b>); none for others."""
    if method == "sigmatune":
        return dict(structure="diagonal", band=0)
    if method.startswith("sigmatune-band"):
        return dict(structure="band", band=int(method.removeprefix("sigmatune-band")))
    return {}


def wrap(base, method: str, rank, cache: str):
    """(model to train, unwrap function) for one row: frozen, sigmatune[-band<b>], lora, eigentune-<backend>."""
    if method == "frozen":
        return base, lambda: base
    if method.startswith("sigmatune"):
        from sigmatune import SigmaConfig, get_sigma_model

        band = structure_of(method)["band"]
        structure = dict(structure="band", band=band) if band else {}
        config = SigmaConfig(rank=rank, target_modules=TARGETS, cache_dir=cache, **structure)
        model = get_sigma_model(base, config, progress=False)
        return model, model.unload
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(base, config)
        return model, model.unload
    if method.startswith("eigentune-"):
        import eigentune

        backend = method.removeprefix("eigentune-")
        config = eigentune.EigenTuneConfig(
            rank=rank, target_modules=TARGETS, backend=backend, cache_dir=cache
        )
        model = eigentune.get_eigentune_model(base, config)
        return model, lambda: eigentune.unload(model)
    raise ValueError(f"unknown method {method!r}")


def timed_init(base, method: str, rank):
    """(model, unwrap, cold s, warm s or None): wrapped with an empty basis cache, unwrapped, wrapped again
    from the cache."""
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


def runner_for(model, base, mode: str, regions: bool):
    """What a step calls: the model itself (eager), or compiled — each decoder layer its own region, or the
    whole model; graphed rows always compile the whole model (one CUDA graph replayed per region would
    overwrite the outputs the next region reads)."""
    if mode == "eager":
        return model
    if mode == "compiled" and regions:
        for layer in base.model.layers:
            layer.compile(fullgraph=True)
        return model
    return torch.compile(model, fullgraph=True, mode="reduce-overhead" if mode == "graphed" else None)


def uncompile(base) -> None:
    for layer in base.model.layers:
        layer._compiled_call_impl = None
    torch._dynamo.reset()


def train_steps(model, base, mode: str, regions: bool, tokens: tuple[int, int], warmup: int, timed: int):
    """([step ms of the timed steps], peak allocated GiB, seconds to the end of the first step): forward +
    backward + AdamW (fused on CUDA), the input embeddings requiring grad (backward runs through every layer),
    synchronised around each step."""
    device = base.get_input_embeddings().weight.device
    runner = runner_for(model, base, mode, regions)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, tokens, generator=torch.Generator().manual_seed(0)).to(device)
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, first = [], float("nan")
    for step in range(warmup + timed):
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
        if step >= warmup:
            times.append(1000 * (time.perf_counter() - start))
        elif step == 0:
            first = time.perf_counter() - start
            print(f"  first step (compile included): {first:.1f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    uncompile(base)
    return times, peak, first


# ---- the serving engine (serve, profile_serve) --------------------------------------------------------------


def serving_engine(served, batch: int, length: int, prompt: int):
    """The serving engine (sigmatune.serving.engine.Engine) over a model or an AdapterBank, `batch` slots of
    `length` positions, prefilling a whole batch of prompts at once; driven by engine_run."""
    return internals().Engine(served, max_batch=batch, max_len=length, prefill_tokens=batch * prompt)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def engine_run(engine, names: list[str], vocab: int, prompt: int, tokens: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) of one batch of random prompts, a request per name (its
    adapter), `tokens` decoded greedily each, all submitted at once and driven step by step in this thread."""
    firsts, counts = [], [0]

    def emit(token, finish):
        if token is not None:
            counts[0] += 1
            if counts[0] <= len(names):
                firsts.append(time.perf_counter())

    for ids, name in zip(prompts(len(names), prompt, vocab), names, strict=True):
        engine.submit(internals().Request(ids, name, tokens, emit))
    sync()
    start = time.perf_counter()
    while not engine.idle():
        engine.step()
    sync()
    end = time.perf_counter()
    first = max(firsts)
    return first - start, (counts[0] - len(names)) / max(end - first, 1e-9)


def random_adapters(bank, count: int, prefix: str, scale: float = 0.05) -> list[str]:
    """`count` adapters of random vectors added to the bank at once; their names."""
    names = [f"{prefix}{i}" for i in range(count)]
    generator = torch.Generator(device=bank.device).manual_seed(count)
    block = {
        name: torch.randn(count, layer.stored_rank, generator=generator, device=layer.sigma_basis.device)
        * scale
        for name, layer in bank.layers.items()
    }
    bank.add_many(names, block)
    return names
