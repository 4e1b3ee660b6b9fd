"""A short model card (README.md) beside a saved adapter: what it is, what it was trained on and how to
load it, for whoever downloads the folder. It is not part of the adapter: reading never looks at it,
and it is written after (and apart from) the checksummed files.

A card carries a line that marks it as sigmatune's (after the YAML header, which the Hub reads only at
the top of the file); a README.md without that line is someone's own and is left as it is.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from .adapter_file import AdapterRecord
from .files import atomic_write_bytes

CARD_NAME = "README.md"
MARK_WINDOW = 4096  # bytes: the mark follows the card's short YAML header
MARK = (
    "<!-- sigmatune model card: save_pretrained rewrites this file; delete this line to keep your edits -->"
)


def write_model_card(
    directory: str | Path, record: AdapterRecord, training: dict | None = None, name: str | None = None
) -> bool:
    """Write the card for `record` into directory (with `training`, a training_summary.json's content,
    its data and scores; `name` the folder's name where it will be, default directory's); False, writing nothing, where a README.md of someone else's is there (anything
    but a regular file that starts with our mark) or the card cannot be written (a warning says why: the
    adapter beside it is saved either way)."""
    path = Path(directory) / CARD_NAME
    if not _ours_or_absent(path):
        return False
    try:
        atomic_write_bytes(path, model_card(record, name or Path(directory).name, training).encode("utf-8"))
    except OSError as err:
        warnings.warn(
            f"the adapter is saved, but its model card {path} could not be written ({err})", stacklevel=3
        )
        return False
    return True


def _ours_or_absent(path: Path) -> bool:
    """Whether path is free for our card: absent, or a regular file (not a link, FIFO, folder or device)
    whose first MARK_WINDOW bytes hold the mark. Reads at most that much, and never blocks."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        head = os.read(handle, MARK_WINDOW) if stat.S_ISREG(os.fstat(handle).st_mode) else b""
    finally:
        os.close(handle)
    return MARK.encode() in head


def model_card(record: AdapterRecord, name: str, training: dict | None = None) -> str:
    config = record.config
    base = record.base_model_name_or_path or "the base model it was trained on"
    numbers = sum(layer.vector.numel() for layer in record.layers.values())
    structure = f"band, half-width {config.band}" if config.structure == "band" else "diagonal"
    lines = [
        "---",
        f"base_model: {record.base_model_name_or_path or ''}",
        "library_name: sigmatune",
        "license: # the license you release this adapter under",
        "tags: [sigmatune, singular-value-fine-tuning]",
        "---",
        MARK,
        "",
        f"# {name}",
        "",
        f"A [sigmatune](https://github.com/sigmatune/sigmatune) adapter for `{base}`: each adapted layer",
        "keeps its weight W = U diag(σ) Vᵀ frozen and trains a small object over its singular values.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| structure | {structure}, {config.update} update |",
        f"| singular values per layer | {config.rank} |",
        f"| layers | {len(record.layers)} (`{_targets(config.target_modules)}`) |",
        f"| trained numbers | {numbers:,} |",
        f"| sigmatune | {record.info.get('sigmatune_version', '?')} |",
    ]
    if training:
        lines += ["", *_training_lines(training)]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from sigmatune import AutoSigmaModelForCausalLM",
        "",
        f'model = AutoSigmaModelForCausalLM.from_pretrained("{name}")  # the base model as recorded above',
        "```",
        "",
        f'or, with the base model loaded yourself, `SigmaModel.from_pretrained(base, "{name}")`; the CLI:',
        f'`sigmatune generate {name} "your prompt"`. Loading checks that the base model is the one it was',
        "trained on (its singular values at the adapted directions).",
        "",
    ]
    return "\n".join(lines)


def _training_lines(training: dict) -> list[str]:
    settings, task = training.get("settings", {}), training.get("task", {})
    lines = ["## Training", ""]
    if task:
        lines.append(f"Data: {task.get('source', task.get('name'))}.")
        lines.append(f"{task.get('train', 0):,} examples for training, {task.get('heldout', 0):,} held out.")
    lr, chosen = settings.get("lr"), training.get("chosen_lr")
    lr = f"{chosen} (chosen by lr {lr})" if chosen is not None and chosen != lr else lr
    lines.append(
        f"{settings.get('steps')} steps of {settings.get('batch_size')} examples at lr {lr} on "
        f"{training.get('device')} ({training.get('train_seconds')} s)."
    )
    before, after = training.get("before"), training.get("after")
    if before and after:
        lines += ["", "| held out | before | after |", "|---|---|---|"]
        lines.append(f"| loss | {before['loss']:.4f} | {after['loss']:.4f} |")
        if before.get("accuracy") is not None and after.get("accuracy") is not None:
            lines.append(
                f"| exact match | {100 * before['accuracy']:.1f}% | {100 * after['accuracy']:.1f}% |"
            )
    return lines


def _targets(targets) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)
