"""`sigmatune <command>`: a table from command name to one public function (commands.py, and
training/job.py for train); no logic of its own.

sigmatune train [--rank auto --steps 150 ...]        fine-tune (defaults: SmolLM2-135M on BIG-bench qa_wikidata)
sigmatune eval ADAPTER                             held-out loss and exact match, base vs adapted
sigmatune inspect ADAPTER [--plot out.png]         what the adapter learned, per layer
sigmatune merge ADAPTER OUTPUT                     a plain HF model folder with the adapter merged
sigmatune export ADAPTER OUTPUT [--format lora]    the adapter as a PEFT LoRA folder
sigmatune compress ADAPTER OUTPUT --rank R         the adapter kept to its R largest directions per layer
sigmatune generate ADAPTER "prompt"                the adapted model's answer
sigmatune serve [--adapters DIR --port 8000]       an OpenAI-compatible server over the adapters in DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys

from .core import progress
from .training import settings
from .version import __version__


def _commands():
    """commands.py, imported when a command runs (it brings torch and transformers: ~5 s that --help and
    a mistyped option need not wait for)."""
    from . import commands

    return commands


def _rank(text: str) -> int | str:
    return text if text in ("full", "auto") else _number(int, text, "a whole number, 'full' or 'auto'")


def _lr(text: str) -> float | str:
    """A number, "auto", or a comma-separated sweep (kept as text: TrainSettings checks it)."""
    if text == "auto" or "," in text:
        return text
    return _number(float, text, "a number, 'auto' or numbers separated by commas")


def _seconds(text: str) -> float:
    seconds = _number(float, text, "a number of seconds")
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ≥ 0")
    return seconds


def _number(kind, text: str, wanted: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainSettings field; its help is the field's inline comment."""
    try:
        source = inspect.getsource(settings.TrainSettings)
    except OSError:  # installed without sources
        source = ""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))
    for field in dataclasses.fields(settings.TrainSettings):
        flag, help = "--" + field.name.replace("_", "-"), comments.get(field.name, "")
        if isinstance(field.default, bool):  # --packing / --no-packing
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
            continue
        kind = {"rank": _rank, "lr": _lr}.get(field.name, type(field.default))
        parser.add_argument(flag, type=kind, default=field.default, help=f"{help} (default: %(default)s)")


def _train(args) -> dict:
    from .training import job

    fields = {f.name for f in dataclasses.fields(settings.TrainSettings)}
    chosen = settings.TrainSettings(**{k: v for k, v in vars(args).items() if k in fields})
    return job.train(chosen, setup_seconds=args.setup_seconds)


def _compress(args) -> None:
    """compress, once --rank is checked: at least 1 (before anything loads), below the adapter's largest
    per-layer rank (read from its file: no model loads), else nothing would be compressed."""
    if args.rank < 1:
        raise ValueError(
            f"--rank must be a whole number ≥ 1 (the directions kept per layer), got {args.rank}"
        )
    from .formats.adapter_file import read_adapter

    largest = max(len(layer.indices) for layer in read_adapter(args.adapter).layers.values())
    if args.rank >= largest:
        raise ValueError(
            f"--rank {args.rank} keeps every direction of {args.adapter} (its layers have at most {largest} "
            f"directions): nothing to compress; choose a --rank below {largest}"
        )
    _commands().compress_adapter(args.adapter, args.output, args.rank, args.model, args.data, args.calibrate)


def _add_model_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument(
        "--model", help="base model path or name (default: the one the adapter was trained on)"
    )
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigmatune", description="Fine-tune and use singular-value adapters."
    )
    parser.add_argument("--version", action="version", version=f"sigmatune {__version__}")
    parser.add_argument(
        "--progress-seconds",
        type=_seconds,
        metavar="S",
        help="without a terminal, a progress line at most S seconds apart (default: 15; 0: every tenth)",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="command")

    command = subcommands.add_parser("train", help="fine-tune a model's singular values on a task")
    _train_arguments(command)
    command.add_argument(
        "--setup-seconds",
        type=_seconds,
        metavar="S",
        help="seconds spent before the job (scripts/train.sh's set-up): the time table's first phase",
    )
    command.set_defaults(run=_train)

    command = subcommands.add_parser("eval", help="held-out loss and exact match of a saved adapter")
    command.add_argument("adapter", help="adapter folder")
    _add_model_options(command)
    command.add_argument("--data", help="task spec or file (default: the training data)")
    command.add_argument("--heldout", type=int, help="held-out examples (default: as in training)")
    command.add_argument("--eval-accuracy", type=int, help="examples scored by exact match")
    command.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    command.set_defaults(
        run=lambda a: _commands().evaluate_adapter(
            a.adapter, a.model, a.data, a.heldout, a.eval_accuracy, a.device, a.dtype
        )
    )

    command = subcommands.add_parser("inspect", help="per-layer summary of a saved adapter")
    command.add_argument("adapter", help="adapter folder")
    command.add_argument("--plot", metavar="PNG", help="also draw the learned scales and base spectra")
    command.set_defaults(run=lambda a: _commands().inspect_adapter(a.adapter, a.plot))

    command = subcommands.add_parser("merge", help="write a plain HF model with the adapter merged in")
    command.add_argument("adapter", help="adapter folder")
    command.add_argument("output", help="folder for the merged model")
    _add_model_options(command, device=False)
    command.add_argument(
        "--dtype", default="float32", help="dtype of the merged weights (default: %(default)s)"
    )
    command.set_defaults(run=lambda a: _commands().merge_adapter(a.adapter, a.output, a.model, a.dtype))

    command = subcommands.add_parser("export", help="write an adapter in another format (a PEFT LoRA folder)")
    command.add_argument("adapter", help="adapter folder")
    command.add_argument("output", help="folder for the exported adapter")
    command.add_argument("--format", default="lora", choices=["lora"])
    _add_model_options(command, device=False)
    command.set_defaults(run=lambda a: _commands().export_adapter(a.adapter, a.output, a.format, a.model))

    command = subcommands.add_parser("compress", help="keep an adapter's largest directions: a small adapter")
    command.add_argument("adapter", help="adapter folder")
    command.add_argument("output", help="folder for the compressed adapter")
    command.add_argument("--rank", type=int, required=True, help="directions kept per layer")
    command.add_argument(
        "--calibrate",
        type=int,
        default=64,
        metavar="N",
        help="weigh directions by their effect on N training examples (0: by the update alone; default 64)",
    )
    command.add_argument("--data", help="data to calibrate on (default: what the adapter was trained on)")
    _add_model_options(command, device=False)
    command.set_defaults(run=_compress)

    command = subcommands.add_parser("generate", help="the adapted model's answer to a prompt")
    command.add_argument("adapter", help="adapter folder")
    command.add_argument("prompt", help="the user's message")
    _add_model_options(command)
    command.add_argument("--max-new-tokens", type=int, default=64)
    command.set_defaults(
        run=lambda a: _commands().generate(a.adapter, a.prompt, a.model, a.max_new_tokens, a.device)
    )
    command = subcommands.add_parser(
        "serve", help="an OpenAI-compatible server over a base model and adapters"
    )
    command.add_argument("--model", default="smollm2", help="base model path or name (default: %(default)s)")
    command.add_argument("--adapters", help="folder whose subfolders are adapters (served by folder name)")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=8000)
    command.add_argument(
        "--rank", type=int, help="bases for every principal adapter up to this rank (hot-loads)"
    )
    command.add_argument("--device", default="auto")
    command.add_argument("--dtype", default="auto")
    command.add_argument(
        "--max-batch",
        type=int,
        help="requests decoded together: slots of the KV cache (default: 32 on a CPU; on a GPU as many as "
        "half the free memory holds, up to 1024)",
    )
    command.add_argument("--max-resident", type=int, help="adapters kept in memory (LRU; the rest reload)")
    command.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of a request that gives none (default: 0, greedy; OpenAI's API defaults "
        "to 1); a request's own temperature is always used",
    )
    command.set_defaults(
        run=lambda a: _commands().serve(
            a.model,
            a.adapters,
            a.host,
            a.port,
            a.rank,
            a.device,
            a.dtype,
            a.max_batch,
            a.max_resident,
            a.temperature,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.progress_seconds is not None:
        progress.report_every(args.progress_seconds)
    try:
        args.run(args)
    except KeyboardInterrupt:
        resume = "; continue from the last checkpoint with --resume" if args.command == "train" else ""
        print(
            f"sigmatune {args.command}: interrupted; files already saved are left as they were{resume}",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `sigmatune inspect A | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except (ValueError, RuntimeError, OSError, ArithmeticError, MemoryError, ImportError, KeyError) as err:
        print(f"sigmatune {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
