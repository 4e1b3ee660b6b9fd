"""TrainSettings: every setting of the main job, in one flat dataclass validated on creation; the
option of `sigmatune train` each field becomes, with its inline comment as the help."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import SigmaConfig
from .data import DEFAULT_DATA, DEFAULT_MODEL


@dataclass
class TrainSettings:
    model: str = DEFAULT_MODEL  # "smollm2" (the default model) or any from_pretrained path / hub name
    data: str = DEFAULT_DATA  # "bigbench:<task>" or a .jsonl/.json/.csv/.txt file
    rank: int | str = "full"  # singular values per layer, or "full" (all: the best quality measured)
    targets: str = "all-linear"  # "all-linear", comma-separated names, or a regex
    update: str = "multiplicative"  # "multiplicative" or "additive"
    structure: str = "diagonal"  # "diagonal" (a vector over the spectrum) or "band" (a banded matrix M)
    band: int = 0  # --structure band: M's half-width b (2b+1 diagonals per layer)
    lr: float = 1e-2  # peak learning rate (vector methods want ~10x LoRA's; the best in both quality sweeps)
    steps: int = 150  # optimizer steps
    batch_size: int = 8  # examples per step
    max_length: int = 128  # tokens per example (prompt + answer)
    heldout: int = 200  # held-out examples (loss); a seeded shuffle picks them
    eval_accuracy: int = 100  # held-out examples scored by exact match (0 = skip)
    warmup: float = 0.05  # share of steps with a linear warm-up
    device: str = "auto"  # "auto" (cuda when there is one), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    output_dir: str = "sigmatune-adapter"  # where the adapter and training_summary.json go
    seed: int = 0  # data order, held-out split and any random init
    save_every: int = 50  # write a checkpoint every this many steps (0 = never) into the output folder
    resume: bool = False  # continue the interrupted run whose checkpoint is in the output folder

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "heldout", "eval_accuracy", "save_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name in ("eval_accuracy", "save_every") else 1)
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.lr < 10:
            raise ValueError(f"lr must be a positive learning rate below 10, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup!r}")

    def sigma_config(self) -> SigmaConfig:
        targets = self.targets  # "all-linear", a regex, or names: "q_proj" / "q_proj,v_proj"
        if targets != "all-linear" and ("," in targets or targets.isidentifier()):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return SigmaConfig(
            rank=self.rank,
            target_modules=targets,
            update=self.update,
            structure=self.structure,
            band=self.band,
        )


# the settings a resumed run must share with the interrupted one to end with the same numbers
TRAJECTORY = ("model", "data", "rank", "targets", "update", "structure", "band", "lr", "steps", "batch_size")
TRAJECTORY += ("max_length", "heldout", "warmup", "dtype", "seed")
