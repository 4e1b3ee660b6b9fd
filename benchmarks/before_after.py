"""Is a change free? The same rows of train_step.py and serve.py measured for an older checkout and for this one,
one right after the other on one machine, and each row's speed after ÷ before.

    git worktree add .bench/old REV      # the code before the change (.bench/ is ignored; on the GPU machine
                                         # name it in run's carry)
    python benchmarks/before_after.py --before .bench/old [--phases eager,compiled,serve] [--budget 560]

Phases (each runs the older checkout's script, then this checkout's, as subprocesses, each with its own
sources on PYTHONPATH; the ratios inside a script are to its own frozen / base row, so a change of the host's
speed between the two runs moves both sides of a ratio alike):
  eager     train_step.py --rows ROWS --rounds 3
  compiled  the same rows compiled (regions), --rounds 2
  serve     serve.py --batches 64,1024 --ranks 16,128 (no PEFT or previous-engine rows)
A phase starts only while --budget seconds leave room for its estimate (a GPU command has a time limit; the
rows of a phase cut short are kept). Rows: phase, method, rank, adapters, batch (serving), before and after
(step ms, or decode tokens/s), after_over_before (step ms: below 1 is faster; tokens/s: above 1 is faster),
the two versions' ratios to their own frozen / base row, device. Each version's own rows are kept beside it
(--out's folder: before_after_<phase>_<version>.json).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
ROWS = "frozen:0,sigmatune:16,sigmatune:64,sigmatune:full,sigmatune-band1:full,lora:16"
ESTIMATE_S = {"eager": 240, "compiled": 340, "serve": 540}  # about what both versions take, 1.1B shape


def commands(phase: str, args) -> tuple[str, list[str], str, str]:
    """(script, its arguments, the speed key, the ratio key) of a phase."""
    if phase == "serve":
        serve = ["--batches", "64,1024", "--ranks", "16,128", "--peft", "", *shlex.split(args.serve_args)]
        return "serve.py", serve, "tokens_per_s", "ratio_vs_base"
    rows = ",".join(f"{row}:c" for row in args.rows.split(",")) if phase == "compiled" else args.rows
    rounds = "2" if phase == "compiled" else "3"
    train = ["--rows", rows, "--rounds", rounds, *shlex.split(args.train_args)]
    return "train_step.py", train, "step_ms", "ratio_vs_frozen"


def run_version(checkout: Path, script: str, arguments: list[str], out: Path, limit_s: float) -> list[dict]:
    """One version's script on its own sources; its rows (those it wrote before a time limit, if one came)."""
    benchmarks = checkout / "benchmarks"
    if '"--previous"' in (benchmarks / script).read_text():  # an older serve.py also ran the previous engine
        arguments = [*arguments, "--previous", ""]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, script, *arguments, "--out", str(out)]
    try:
        subprocess.run(command, cwd=benchmarks, env=env, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        print(f"{checkout} {script}: stopped at its limit of {limit_s:.0f} s (its rows so far are kept)")
    return common.load_rows(out)


def compare(phase: str, before: list[dict], after: list[dict], speed: str, ratio: str) -> list[dict]:
    """One row per configuration both versions measured."""

    def key(row: dict) -> tuple:
        return row["method"], str(row["rank"]), row.get("adapters"), row.get("batch")

    older = {key(row): row for row in before}
    rows = []
    for row in after:
        old = older.get(key(row))
        if old is None:
            continue
        rows.append(
            dict(phase=phase, method=row["method"], rank=row["rank"], adapters=row.get("adapters"),
                 batch=row.get("batch"), before=old[speed], after=row[speed],
                 after_over_before=round(row[speed] / old[speed], 3), ratio_before=old[ratio],
                 ratio_after=row[ratio], device=row["device"])
        )  # fmt: skip
    return rows


def main() -> None:
    options = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    options.add_argument(
        "--out", type=Path, default=common.RESULTS / "before_after.json", help="the results file"
    )
    options.add_argument("--before", type=Path, required=True, help="a checkout of the older code")
    options.add_argument("--phases", default="eager,compiled,serve", help="eager, compiled, serve (in order)")
    options.add_argument("--rows", default=ROWS, help="train_step rows (method:rank,...)")
    options.add_argument("--budget", type=float, default=560, help="seconds all phases may take")
    options.add_argument("--train-args", default="", help="more arguments for train_step.py (both versions)")
    options.add_argument("--serve-args", default="", help="more arguments for serve.py (both versions)")
    args = options.parse_args()
    if not (args.before / "benchmarks" / "train_step.py").exists():
        raise SystemExit(
            f"--before {args.before}: not a sigmatune checkout (make one: git worktree add {args.before} REV)"
        )
    started, results = time.monotonic(), []
    for phase in args.phases.split(","):
        left = args.budget - (time.monotonic() - started)
        if left < ESTIMATE_S[phase]:
            print(f"{phase}: skipped, {left:.0f} s left of --budget (it takes ~{ESTIMATE_S[phase]} s)")
            continue
        script, arguments, speed, ratio = commands(phase, args)
        measured = {}
        phase_started = time.monotonic()
        for turn, (version, checkout) in enumerate(
            (("before", args.before.resolve()), ("after", HERE.parent))
        ):
            out = args.out.with_name(f"before_after_{phase}_{version}.json")
            out.unlink(missing_ok=True)
            limit_s = (left - (time.monotonic() - phase_started)) / (
                2 - turn
            )  # the rest of the phase's share
            measured[version] = run_version(checkout, script, arguments, out, limit_s)
        rows = compare(phase, measured["before"], measured["after"], speed, ratio)
        common.merge_rows(args.out, rows, ("phase", "method", "rank", "adapters", "batch", "device"))
        results += rows
    print(markdown(results))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| phase | method | rank | adapters | batch | before | after | after ÷ before | ratio before → after |"
    ]
    lines.append("|" + "---|" * 9)
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['method']} | {r['rank']} | {r['adapters'] or ''} | {r['batch'] or ''} | "
            f"{r['before']} | {r['after']} | {r['after_over_before']:.3f} | {r['ratio_before']} → {r['ratio_after']} |"
        )
    return "\n".join(lines) + "\n\nbefore/after: step ms (train_step) or decode tokens/s (serve).\n"


if __name__ == "__main__":
    main()
