"""TrainSettings: every setting of the main job, in one flat dataclass validated on creation; the
option of `sigmatune train` each field becomes, with its inline comment as the help."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..hub.loading import DEFAULT_MODEL  # torch-free to import: the CLI reads it while parsing

if TYPE_CHECKING:  # at run time imported where used: the CLI parses its options without torch
    import torch

    from ..core.config import SigmaConfig

DEFAULT_DATA = "bigbench:qa_wikidata"

# What rank "auto" takes (and structure "auto" with it), by device: points of the quality sweep's frontier
# for this job (benchmarks/results/quality_bigbench.json, setting "causal", held-out loss / exact match, seeds 0 / 1)
RECIPES = {
    "gpu": dict(rank="full", structure="diagonal", band=0),  # lr 1e-2: 0.5749 / 65%, 0.5210 / 66%
    "cpu": dict(rank=128, structure="band", band=1),  # lr 3e-3: 0.5684 / 65%, 0.5347 / 65%; 2/3 the CPU time
}
LR_DIRECTION = 1e-2  # lr "auto" of the diagonal on a model REFERENCE_BLOCKS deep (SmolLM2-135M's best)
REFERENCE_BLOCKS = 30
LEARNING_RATES = {"dense": 3e-3}  # lr "auto" of the matrix structure (MiniLM's best)


def auto_lr(structure: str, band: int = 0, blocks: int = REFERENCE_BLOCKS) -> float:
    """The centre of lr "auto"'s window (lr_auto.py) = LR_DIRECTION · √(REFERENCE_BLOCKS / blocks) / n on the
    1-3-10 series, where n is the count of trained numbers that sum into one direction's update — 1 for the
    diagonal, a band's 2b+1 (Adam moves each number by about lr a step, so a direction moves by n · lr) — and
    blocks the model's depth (its transformer blocks: a change per layer compounds over them, so a deeper
    model takes a smaller one).
    SmolLM2-135M (30 blocks): diagonal 1e-2, band 1 3e-3, band 4 1e-3, band 16 3e-4; MiniLM (6 blocks): 3e-2,
    1e-2, 3e-3, 1e-3 — the best lrs the default job's and the quality suite's sweeps show on both. The
    matrix structures keep LEARNING_RATES."""
    if structure in LEARNING_RATES:
        return LEARNING_RATES[structure]
    if blocks < 1:
        raise ValueError(f"a model's depth is at least one block, got {blocks!r}")
    per_direction = 2 * band + 1 if structure == "band" else 1
    return one_three(LR_DIRECTION * math.sqrt(REFERENCE_BLOCKS / blocks) / per_direction)


def one_three(value: float) -> float:
    """The 1-3-10 series' value nearest value on a log scale: 0.0026 → 0.003, 0.0095 → 0.01."""
    exponent = math.floor(math.log10(value))
    candidates = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    return float(f"{min(candidates, key=lambda c: abs(math.log(c / value))):.1g}")


@dataclass
class TrainSettings:
    model: str = DEFAULT_MODEL  # "smollm2" (the default model) or any from_pretrained path / hub name
    data: str = DEFAULT_DATA  # "bigbench:<task>" or a .jsonl/.json/.csv/.txt file
    rank: int | str = "auto"  # singular values per layer, "full" (all), or "auto" (this device's recipe)
    targets: str = "all-linear"  # "all-linear", comma-separated names, or a regex
    update: str = "multiplicative"  # "multiplicative" or "additive"
    structure: str = "auto"  # "diagonal" (a vector over the spectrum), "band" (a banded matrix M), or "auto"
    band: int = 0  # --structure band: M's half-width b (2b+1 diagonals per layer)
    lr: float | str = "auto"  # peak lr, "auto" (4 tried: the rule's unless one is clearly better), or "a,b,c"
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
    packing: bool = True  # each batch as one row, the prompt prefix its examples share once (exact: checked)
    manifest: str = ""  # a .jsonl of adapters to train together, one {"name", "data", ...settings} a line

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "heldout", "eval_accuracy", "save_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name in ("eval_accuracy", "save_every") else 1)
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:  # the answer gets half the tokens: with one, no answer token is left
            raise ValueError(
                f"--max-length {self.max_length} leaves no answer token to learn from (the loss would be 0/0); "
                "it must be at least 2 (the default is 128)"
            )
        if isinstance(self.lr, str) and self.lr != "auto":
            self.lr_candidates()  # a comma-separated list, checked
        elif self.lr != "auto" and (isinstance(self.lr, bool) or not 0 < self.lr < 10):
            raise ValueError(f"lr must be a positive learning rate below 10 or 'auto', got {self.lr!r}")
        if self.manifest and self.lr_candidates():
            raise ValueError(
                "--manifest and a sweep of --lr values cannot be combined: give each manifest line its own lr"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup!r}")

    def on_device(self, device: torch.device, smallest: int) -> TrainSettings:
        """These settings with "auto" resolved for the device and the smallest min(in, out) of the targeted
        layers. Rank "auto" takes the device's RECIPES entry (on a CPU the
        band b = 1 over the top 128 singular values, as good as the full spectrum on the default job at about
        2/3 of its step time; elsewhere the full spectrum; "full" where a layer has fewer), and so does
        structure "auto" with it; beside a rank of the user's, structure "auto" is the diagonal. A band given
        with structure "auto" makes it a band. lr "auto" stays: the job trains a window of lrs around auto_lr's
        for the structure, band and the model's depth (lr_auto.py)."""
        recipe = RECIPES["cpu" if device.type == "cpu" else "gpu"]
        changes = {}
        if self.rank == "auto":
            fits = recipe["rank"] == "full" or recipe["rank"] <= smallest
            changes["rank"] = recipe["rank"] if fits else "full"
        structure, band = self.structure, self.band
        if structure == "auto":
            structure = "band" if band else (recipe["structure"] if self.rank == "auto" else "diagonal")
            band = band or (recipe["band"] if structure == "band" else 0)
            changes.update(structure=structure, band=band)
        return dataclasses.replace(self, **changes)

    def lr_candidates(self) -> list[float] | None:
        """The learning rates of a sweep (lr "a,b,c": at least two, each positive, below 10), else None."""
        if not isinstance(self.lr, str) or self.lr == "auto":
            return None
        try:
            rates = [float(part) for part in self.lr.split(",")]
        except ValueError:
            rates = []
        distinct = len({f"{r:g}" for r in rates}) == len(rates)  # each names an adapter (lr_<rate>)
        if len(rates) < 2 or not distinct or not all(0 < r < 10 for r in rates):
            raise ValueError(
                f"lr must be a learning rate, 'auto', or at least two different ones separated by commas "
                f"(a sweep, e.g. 3e-3,1e-2,3e-2; different in their first 6 digits), each positive and below 10; "
                f"got {self.lr!r}"
            )
        return rates

    def trains_several(self) -> bool:
        """Whether this job trains several adapters at once: a sweep of learning rates, or a manifest."""
        return bool(self.manifest) or self.lr_candidates() is not None

    def is_resolved(self) -> bool:
        """Whether the rank and structure are the model's own (lr "auto" is the job's to resolve: lr_auto.py)."""
        return "auto" not in (self.rank, self.structure)

    def sigma_config(self) -> SigmaConfig:
        """The adapter's config ("auto" checked as the full spectrum, diagonal or band as `band` says:
        on_device resolves it first)."""
        from ..core.config import SigmaConfig

        targets = self.targets  # "all-linear", a regex, or names: "q_proj" / "q_proj,v_proj"
        if targets != "all-linear" and ("," in targets or targets.isidentifier()):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return SigmaConfig(
            rank="full" if self.rank == "auto" else self.rank,
            structure=("band" if self.band else "diagonal") if self.structure == "auto" else self.structure,
            target_modules=targets,
            update=self.update,
            band=self.band,
        )


# the settings a resumed run must share with the interrupted one to end with the same numbers
TRAJECTORY = ("model", "data", "rank", "targets", "update", "structure", "band", "lr", "steps", "batch_size")
TRAJECTORY += ("max_length", "heldout", "warmup", "dtype", "seed", "packing", "manifest")


# the JSON types each setting's annotation allows (a bool is no number here, a number no bool)
_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def from_record(recorded: dict) -> TrainSettings:
    """TrainSettings from recorded ones (a training_summary.json's "settings"): each known field of the
    type its annotation names, the rest at their defaults, fields of no setting ignored. A value of
    another type is a ValueError naming the field; TrainSettings checks the values."""
    values = {}
    for field in dataclasses.fields(TrainSettings):
        if field.name in recorded:
            value = recorded[field.name]
            if not _of_type(value, str(field.type)):
                raise ValueError(f"settings.{field.name} is {value!r:.60}, not a {field.type}")
            values[field.name] = value
    return TrainSettings(**values)


def _of_type(value, annotation: str) -> bool:
    """Whether a JSON value is of an annotation's types: a bool is no number, a number no bool, a number
    is finite and a whole one fits in 64 bits."""
    allowed = tuple(t for name in annotation.split(" | ") for t in _JSON_TYPES[name])
    if not isinstance(value, allowed) or isinstance(value, bool) != (bool in allowed):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or abs(value) < 2**63
