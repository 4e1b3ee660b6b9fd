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
on); the other seeds repeat each method's best seed-0 lr; a sigmatune row also runs at lr "auto" on every seed
(the rule `sigmatune train` uses: training/settings.LEARNING_RATES). --workers N runs N processes side by side
on the one device (a small model leaves a GPU mostly idle).

A run resumes: a row already in --out is not run again; --budget S starts no row after S seconds (a GPU
command has a time limit), so calling it again goes on where it stopped.

Rows (results/quality.json, merged by task, model, method, structure, band, rank, lr, seed, recipe) have exactly
the keys task, model, method, structure, band, rank, lr (a number, or "auto", then also lr_chosen), seed,
trainable, eval_loss, accuracy, recipe, step_ratio (null: a step's cost is train_step.py's). What else a run
measured (device, wall time, step ms, macro-F1, loss curve, an error) goes to results/quality_runs.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from quality_suite.loops import CAUSAL_STEPS
from quality_suite.methods import FULL, NONE, PEERS, RECIPES, SIGMATUNE, Method, sigmatune
from quality_suite.tasks import TASKS, split

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
KEY = ("task", "model", "method", "structure", "band", "rank", "lr", "seed", "recipe")
ROW_KEYS = (*KEY[:7], "lr_chosen", "seed", "trainable", "eval_loss", "accuracy", "recipe", "step_ratio")


def parse_method(spec: str) -> Method:
    """A --methods entry → a Method (see the module's docstring)."""
    if spec in RECIPES:
        return RECIPES[spec]
    name, *rest = spec.split(":")
    if name == "sigmatune":
        rank = rest[0] if rest else "full"
        return sigmatune(rank if rank == "full" else int(rank), *rest[1:2], *map(int, rest[2:3]))
    return Method(name, int(rest[0]) if rest else None)


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


def run_rows(rows: list[dict], args) -> list[dict]:
    """The rows, run: each with its scores (exactly ROW_KEYS) and a details row, both merged into the results
    files after every row. With --workers, shares of the rows run in that many processes."""
    finished = {tuple(r.get(k) for k in KEY) for r in common.load_rows(args.out)}
    rows = [r for r in rows if tuple(r.get(k) for k in KEY) not in finished]  # (a run resumed)
    if args.workers > 1 and len(rows) > 1:
        return run_in_workers(rows, args)
    from quality_suite.loops import run

    device = common.pick_device(args.device)
    models = {"minilm": Path(args.encoder) if args.encoder else None, "smollm2": args.causal_model}
    done, data = [], {}
    for count, row in enumerate(rows):
        if time.time() > args.deadline:
            print(f"stopped at --budget: {len(rows) - count} rows left (run again to go on)", flush=True)
            break
        task = TASKS[row["task"]]
        if task.name not in data:  # one held-out split for every seed (a seed: the init and the order)
            data[task.name] = split(task, 0, args.items, *common.ints(args.limit))
        lr = row["lr_chosen"] if row["lr"] == "auto" else row["lr"]
        started = time.perf_counter()
        try:
            measured = run(
                task, method_of(row), lr, row["seed"], data[task.name], models, device, args.causal_steps
            )
        except (FloatingPointError, RuntimeError, ValueError) as err:  # a diverging lr (or a peer this peft
            # lacks) is a result, not a crash
            print(f"{row}: FAILED {type(err).__name__}: {err}"[:600], file=sys.stderr, flush=True)
            measured = dict(
                trainable=None, eval_loss=None, accuracy=None, error=f"{type(err).__name__}: {err}"[:300]
            )
        scores = {k: measured.get(k) for k in ("trainable", "eval_loss", "accuracy")}
        result = {k: v for k, v in {**row, **scores, "step_ratio": None}.items() if k in ROW_KEYS}
        details = {
            **row,
            **measured,
            "device": common.device_name(device),
            "run_s": round(time.perf_counter() - started, 1),
        }
        common.merge_rows(args.out, [result], KEY)
        common.merge_rows(details_path(args.out), [details], KEY)
        print(json.dumps({k: v for k, v in details.items() if k != "curve"}), flush=True)
        done.append(result)
    return done


def run_in_workers(rows: list[dict], args) -> list[dict]:
    """rows dealt round-robin to args.workers processes of this script (`work`), each into its own results
    files; merged here when all are done (a row a worker finished is kept even if another fails)."""
    folder = Path(tempfile.mkdtemp(prefix="quality-workers-", dir=args.out.parent))
    procs = []
    for w in range(args.workers):
        share = rows[w :: args.workers]
        if not share:
            continue
        (folder / f"rows{w}.json").write_text(json.dumps(share))
        command = [
            sys.executable,
            __file__,
            "work",
            str(folder / f"rows{w}.json"),
            "--out",
            str(folder / f"out{w}.json"),
        ]
        command += forwarded(args)
        procs.append(subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    for proc in procs:
        proc.wait()
    done = []
    for w in range(args.workers):
        rows_out = common.load_rows(folder / f"out{w}.json")
        details = common.load_rows(details_path(folder / f"out{w}.json"))
        common.merge_rows(args.out, rows_out, KEY)
        common.merge_rows(details_path(args.out), details, KEY)
        done += rows_out
    shutil.rmtree(folder)
    return done


def forwarded(args) -> list[str]:
    """The options a worker takes from its parent."""
    options = ["--device", args.device, "--causal-model", args.causal_model, "--limit", args.limit]
    options += ["--causal-steps", str(args.causal_steps), "--deadline", str(args.deadline)]
    options += ["--encoder", args.encoder] if args.encoder else []
    return options + (["--items", str(args.items)] if args.items else [])


def details_path(out: Path) -> Path:
    return out.with_name(out.stem + "_runs.json")


# ---- the sweep ----------------------------------------------------------------------------------------------


def sweep(args) -> None:
    """Seed 0 at each method's LRS (and lr "auto" for sigmatune), one more lr past an edge that wins, then the
    other seeds at each method's best seed-0 lr (and "auto")."""
    from sigmatune.training.settings import LEARNING_RATES

    seeds = common.ints(args.seeds)
    tasks = [TASKS[name] for name in args.tasks.split(",")]
    resolve_models(args, {t.model for t in tasks})
    plan = {
        t.name: [parse_method(m) for m in args.methods.split(",")] if args.methods else default_methods(t)
        for t in tasks
    }

    def auto(task, method, seed) -> list[dict]:
        if method.method != "sigmatune":
            return []
        return [{**row_of(task, method, "auto", seed), "lr_chosen": LEARNING_RATES[method.structure]}]

    first = [
        row
        for t in tasks
        for m in plan[t.name]
        for row in [row_of(t, m, lr, 0) for lr in LRS[m.method]] + auto(t, m, 0)
    ]
    run_rows(first, args)
    for _ in range(2):  # one lr further where the best is at an edge of the sweep (twice at most)
        further = []
        for t in tasks:
            for m in plan[t.name]:
                swept = seed0(common.load_rows(args.out), t.name, m)
                beyond = next_lr(swept)
                if beyond is not None:
                    further.append(row_of(t, m, beyond, 0))
        if not further:
            break
        run_rows(further, args)
    later = []
    for t in tasks:
        for m in plan[t.name]:
            swept = seed0(common.load_rows(args.out), t.name, m)
            if not swept:
                continue
            best = min(swept, key=lambda r: r["eval_loss"])["lr"]
            later += [
                row for seed in seeds if seed != 0 for row in [row_of(t, m, best, seed), *auto(t, m, seed)]
            ]
    run_rows(later, args)


def resolve_models(args, families: set[str]) -> None:
    """The models' folders, made here (once: a worker would race the others to make them)."""
    from quality_suite.loops import minilm_path

    if "minilm" in families and not args.encoder:
        args.encoder = str(minilm_path())
    if "smollm2" in families and args.causal_model == "smollm2":
        from sigmatune.hub.loading import smollm2_path

        args.causal_model = str(smollm2_path())


def seed0(rows: list[dict], task: str, method: Method) -> list[dict]:
    """The seed-0 sweep of a method on a task: its rows at a number lr that finished."""
    return [
        r
        for r in rows
        if r["task"] == task
        and method_of(r) == method
        and r["seed"] == 0
        and r["lr"] != "auto"
        and r["eval_loss"] is not None
    ]


def next_lr(swept: list[dict]) -> float | None:
    """The next lr of the 1-3-10 series past the end of the sweep where its best is, or None (the best is
    inside, or there is no lr to sweep)."""
    lrs = sorted({r["lr"] for r in swept})
    if len(lrs) < 2 or 0.0 in lrs:
        return None
    best = min(swept, key=lambda r: r["eval_loss"])["lr"]
    if best == lrs[0]:
        return one_three(lrs[0] / 3.1)
    if best == lrs[-1] and lrs[-1] < 0.3:
        return one_three(lrs[-1] * 3.4)
    return None


def one_three(value: float) -> float:
    """The 1-3-10 series' value nearest value on a log scale: 0.0026 → 0.003, 0.0095 → 0.01."""
    exponent = math.floor(math.log10(value))
    candidates = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    return float(f"{min(candidates, key=lambda c: abs(math.log(c / value))):.1g}")


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
        lr = min(swept or group, key=lambda r: r["eval_loss"])["lr"]
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
    mean loss ratio over the tasks it ran on; and the plot (loss ratio against trainable parameters, log x)."""
    best = best_rows(rows)
    tasks = sorted({task for task, _ in best})
    lines = []
    ratios: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
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
            ratios.setdefault(label, []).append(ratio)
            shares.setdefault(label, []).append(share)
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
    for label in sorted(ratios, key=lambda k: sum(ratios[k]) / len(ratios[k])):
        lines.append(
            f"| {label} | {len(ratios[label])} | {sum(shares[label]) / len(shares[label]):.2%} | "
            f"{sum(ratios[label]) / len(ratios[label]):.3f} |"
        )
    lines += ["", *tiers(table, tasks)]
    devices = sorted(
        {r.get("device", "?") for r in common.load_rows(details_path(plot.with_suffix(".json")))}
        if plot
        else []
    )
    text = "\n".join(lines) + (f"\n\nDevice: {', '.join(devices)}.\n" if devices else "\n")
    if plot is not None:
        draw(ratios, shares, plot)
    return text


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
        for peer in sorted(peers, key=mean) or ["—"]:
            if peer == "—":
                lines.append(f"| ≤ {tier:.0%} | {best} | {mean(best):.3f} | — | | |")
                continue
            won = sum(table[best][t][0] < table[peer][t][0] for t in tasks)
            lines.append(
                f"| ≤ {tier:.0%} | {best} | {mean(best):.3f} | {peer} | {mean(peer):.3f} | {won} of {len(tasks)} |"
            )
    return lines


def draw(ratios: dict[str, list[float]], shares: dict[str, list[float]], plot: Path) -> None:
    """Mean held-out loss × LoRA r16 against mean trainable parameters × LoRA r16 (log x), with the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    points = []
    for label in ratios:
        x = sum(shares[label]) / len(shares[label])
        y = sum(ratios[label]) / len(ratios[label])
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
        "--budget", type=float, default=1e9, help="run: start no row after this many seconds"
    )
    options.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # work: the parent's, as a time
    args = options.parse_args()
    args.deadline = args.deadline or time.time() + args.budget
    if args.command == "prepare":
        prepare(args)
    elif args.command == "work":
        run_rows(json.loads(Path(args.rows).read_text()), args)
    elif args.command == "run":
        sweep(args)
        print(report(common.load_rows(args.out), None))
    else:
        print(report(common.load_rows(args.out), args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
