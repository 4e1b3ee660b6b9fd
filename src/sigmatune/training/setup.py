"""The steps every training job takes before it trains: the checkpoint to resume (and whether it is this
run's), "auto" settings resolved for the device, settings that fit the model and memory; and a clock of
the job's phases. Used by the one-adapter job (job.py) and the job that trains several (together_job.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..core.device import free_memory, resolve_device
from ..core.targets import find_targets, linear_shapes
from ..formats import checkpoint
from ..formats.checkpoint import CHECKPOINT_NAME
from ..hub.loading import load_model
from .loop import log
from .settings import REFERENCE_BLOCKS, TRAJECTORY, TrainSettings


def prepared(settings: TrainSettings, config):
    """(settings, config, model, tokenizer, device, dtype, checkpoint to resume or None): the model loaded
    on its device, every "auto" setting resolved, the settings fitted to the model, a resumed checkpoint
    checked to be this run's."""
    resumed = checkpoint_to_resume(settings)
    torch.manual_seed(settings.seed)
    device, dtype = resolve_device(settings.device, settings.dtype)
    model, tokenizer = load_model(settings.model, dtype, device)
    if not settings.is_resolved():
        settings = resolve_auto(model, settings, config, device)
        config = settings.sigma_config()
    settings = fit_to_model(model, settings, device)
    if resumed is not None:
        check_same_run(resumed, settings)
    return settings, config, model, tokenizer, device, dtype, resumed


class Phases:
    """Wall seconds per phase of the job; setup_seconds (the time before it, given by scripts/train.sh)
    counts as its first phase, "setup"."""

    def __init__(self, setup_seconds: float | None = None):
        self.seconds: dict[str, float] = {} if setup_seconds is None else {"setup": round(setup_seconds, 1)}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> float:
        """The seconds since the last lap, kept as this phase's."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.seconds[phase] = round(seconds, 1)
        return seconds

    def total(self) -> float:
        return sum(self.seconds.values())


def checkpoint_to_resume(settings: TrainSettings) -> checkpoint.Checkpoint | None:
    """The checkpoint to continue (resume=True), after checking it belongs to a run with these settings;
    without resume, refuse to start over an interrupted run's checkpoint (it would be overwritten)."""
    path = Path(settings.output_dir) / CHECKPOINT_NAME
    if not settings.resume:
        if path.exists():
            raise ValueError(
                f"{path} holds the checkpoint of an interrupted run; continue it with --resume, or delete "
                "it (or choose another --output-dir) to start over"
            )
        return None
    if not path.exists():
        raise ValueError(f"--resume: there is no checkpoint {path} to continue; train without --resume")
    return checkpoint.load(path)


def check_same_run(resumed: checkpoint.Checkpoint, settings: TrainSettings) -> None:
    """A resumed run must share the settings that decide its numbers (after fit_to_model's caps)."""
    defaults = TrainSettings()  # a checkpoint of an older sigmatune lacks the newer settings: their defaults
    saved = {name: resumed.settings.get(name, getattr(defaults, name)) for name in TRAJECTORY}
    differ = [
        f"{name} {saved[name]!r} → {getattr(settings, name)!r}"
        for name in TRAJECTORY
        if saved[name] != getattr(settings, name)
    ]
    if differ:
        raise ValueError(
            f"--resume: the checkpoint in {settings.output_dir} was written by a run with other settings "
            f"({'; '.join(differ)}); resume with the same settings"
        )


def resolve_auto(model, settings: TrainSettings, config, device: torch.device) -> TrainSettings:
    """Settings with every "auto" resolved (TrainSettings.on_device), saying what was chosen."""
    shapes = linear_shapes(model)
    smallest = min(min(shapes[name]) for name in find_targets(model, config.target_modules))
    chosen = settings.on_device(device, smallest)
    structure = f"band b={chosen.band}" if chosen.structure == "band" else chosen.structure
    log(
        f"rank {chosen.rank}, {structure} (the {'auto' if settings.rank == 'auto' else 'default'} choice on "
        f"{device.type}; a GPU takes the full spectrum, diagonal)"
    )
    return chosen


def model_blocks(config) -> int:
    """A model's depth in transformer blocks, from its config (its text model's, for a multimodal one);
    REFERENCE_BLOCKS where the config does not say."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "num_hidden_layers", None) or REFERENCE_BLOCKS


def fit_to_model(model, settings: TrainSettings, device: torch.device) -> TrainSettings:
    """Settings that fit: max_length capped at the model's context; activations (a rough upper
    estimate: per token, 48 bytes per hidden unit per layer plus the logits) beyond free memory refused."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None)
    if context and settings.max_length > context:
        log(f"--max-length {settings.max_length} capped at the model's context of {context} tokens")
        settings = dataclasses.replace(settings, max_length=context)
    tokens = settings.batch_size * settings.max_length
    per_token = 48 * config.hidden_size * config.num_hidden_layers + 8 * config.vocab_size
    need, free = tokens * per_token, free_memory(device)
    if free and need > free:
        raise ValueError(
            f"--batch-size {settings.batch_size} × --max-length {settings.max_length} may need ~{need / 2**30:.1f} "
            f"GiB for activations, more than the {free / 2**30:.1f} GiB free on {device}; lower one of them"
        )
    return settings
