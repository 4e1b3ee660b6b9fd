"""SigmaConfig: every setting of a spectral adapter, in one flat dataclass validated on creation.

A layer W = U diag(σ) Vᵀ (k = min(out, in) singular values) is adapted on a set S of singular
directions, r = |S|. Only a vector over S is trained:

    additive:        W' = U diag(σ + δ) Vᵀ            (δ is trained, as in the seed package)
    multiplicative:  W' = U diag(σ ⊙ (1 + g)) Vᵀ      (g is trained, δ = σ ⊙ g)

(the update rules are defined in updates.py; `update` takes their names). With structure="band" the
trained object is a banded r × r matrix M over S instead (structures.py): W' = W (I + V_S M V_Sᵀ).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .structures.registry import STRUCTURES, structure_of
from .updates import UPDATES, update_rule

INITS = ("zeros", "normal")
SVD_METHODS = ("auto", "exact", "randomized")
BASIS_EFFORT = ("svd", "svd_oversample", "svd_niter", "dtype", "cache_dir", "cache")  # not the adapter's math
MAX_SVD_NITER = 64
MAX_SVD_OVERSAMPLE = 4096
SELECTIONS = ("principal", "minor")
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class SigmaConfig:
    rank: int | str = "full"  # singular values trained per layer: all min(in, out) of them ("full"), or the
    # top r; full is the best quality per parameter measured (benchmarks/quality.py), r ≤ 64 the fastest step
    target_modules: list[str] | str = "all-linear"  # names (exact or dotted suffix), a regex, or "all-linear"
    selection: str | list[int] | dict[str, list[int]] = "principal"  # "principal" = top-r by σ, "minor" =
    # bottom-r, or explicit singular-value indices (0 = largest): one list for every layer, or a dict from
    # layer name (exact or dotted suffix) to a list; explicit indices override `rank`
    update: str = "multiplicative"  # the update rule (updates.py): "additive" trains δ, "multiplicative" g
    structure: str = "diagonal"  # what a layer trains over S: "diagonal" (g), "band" (a banded M) or
    # "dense" (M, r × r): core/structures/
    band: int = 0  # structure="band": M's half-width b, |i − j| ≤ b (2b + 1 diagonals); 0 otherwise
    init: str = "zeros"  # "zeros" = the adapted model equals the base at step 0; "normal" = N(0, init_std²)
    init_std: float = 1e-3  # standard deviation of init="normal"
    # How bases are computed and kept (BASIS_EFFORT): the caller's, never read from an adapter file. Every
    # method gives the exact SVD's directions within svd.BASIS_TOLERANCE; they differ only in cost.
    svd: str = "auto"  # "exact", "randomized" (top singular values; exact where it misses the tolerance), or
    # "auto" = exact (subspace iteration converges slowly on the flat spectra of LLM weights)
    svd_oversample: int = 16  # randomized SVD: columns sampled beyond the largest selected index
    svd_niter: int = 4  # randomized SVD: subspace (power) iterations
    dtype: str | None = None  # dtype of the stored bases ("float32", "bfloat16", ...); None = the weight's
    cache_dir: str | None = None  # basis cache folder; None = $SIGMATUNE_CACHE or ~/.cache/sigmatune
    cache: bool = True  # read and write the on-disk basis cache
    sigma_tol: float = 1e-6  # additive only: leave out directions with σ < sigma_tol · σ_max (δ/σ blows up)

    def __post_init__(self):
        if isinstance(self.selection, tuple):
            self.selection = list(self.selection)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check_rank(self.rank)
        _check_targets(self.target_modules)
        _check_selection(self.selection)
        _check_choice("update", self.update, tuple(UPDATES))
        _check_structure(self.structure, self.band, self.update)
        _check_choice("init", self.init, INITS)
        _check_choice("svd", self.svd, SVD_METHODS)
        if self.svd == "randomized" and (self.rank == "full" or self.selection == "minor"):
            raise ValueError(
                "svd='randomized' finds only the largest singular values; "
                "use svd='exact' (or 'auto') with rank='full' or selection='minor'"
            )
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, tuple(DTYPES))
        for name, most in (("svd_oversample", MAX_SVD_OVERSAMPLE), ("svd_niter", MAX_SVD_NITER)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise ValueError(f"{name} must be an int from 0 to {most}, got {value!r}")
        if not isinstance(self.cache, bool):
            raise ValueError(f"cache must be True or False, got {self.cache!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be a folder path or None, got {self.cache_dir!r}")
        for name in ("init_std", "sigma_tol"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
            ):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")

    # ---- derived values -------------------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The bases' dtype as a torch.dtype (None = follow the weight)."""
        return None if self.dtype is None else DTYPES[self.dtype]

    @property
    def cache_path(self) -> Path:
        """The folder of the basis cache."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return cache_root() / "bases"

    def indices_for(self, layer_name: str, k: int) -> list[int]:
        """Singular-value indices (0 = largest) this config selects in a layer with k singular values."""
        if isinstance(self.selection, (list, dict)):
            indices = self._explicit_indices(layer_name)
            bad = [i for i in indices if i >= k]
            if bad:
                raise ValueError(
                    f"selection for layer {layer_name!r} has indices {bad[:5]} but the layer has only "
                    f"{k} singular values (valid: 0..{k - 1})"
                )
            return sorted(indices)
        r = k if self.rank == "full" else self.rank
        if r > k:
            raise ValueError(
                f"rank={r} is larger than layer {layer_name!r} allows: it has min(in, out) = {k} "
                f"singular values; use rank ≤ {k} or rank='full'"
            )
        return list(range(r)) if self.selection == "principal" else list(range(k - r, k))

    def _explicit_indices(self, layer_name: str) -> list[int]:
        if isinstance(self.selection, list):
            return list(self.selection)
        keys = [key for key in self.selection if name_matches(layer_name, key)]
        if not keys:
            raise ValueError(
                f"selection gives no indices for layer {layer_name!r}; add an entry keyed by its name "
                f"or a dotted suffix of it (keys given: {sorted(self.selection)[:8]})"
            )
        return list(self.selection[max(keys, key=len)])  # the most specific key wins

    def svd_method_for(self, indices: list[int], k: int) -> str:
        """'exact' or 'randomized' for a layer with k singular values and these selected indices: randomized
        where asked for and it samples at most a quarter of the spectrum (else it costs what exact does)."""
        sampled = max(indices) + 1 + self.svd_oversample
        return "randomized" if self.svd == "randomized" and 4 * sampled <= k else "exact"

    # ---- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapter_settings(self) -> dict:
        """The settings that define an adapter's math (what an adapter file records): all but BASIS_EFFORT."""
        return {name: value for name, value in self.to_dict().items() if name not in BASIS_EFFORT}

    def with_effort_of(self, other: SigmaConfig | None) -> SigmaConfig:
        """This adapter's math with other's BASIS_EFFORT settings (the defaults' when other is None)."""
        other = other if other is not None else SigmaConfig()
        return dataclasses.replace(self, **{name: getattr(other, name) for name in BASIS_EFFORT})

    @classmethod
    def from_dict(cls, data: dict) -> SigmaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown SigmaConfig fields {unknown}: the adapter was written by a newer sigmatune; "
                "upgrade sigmatune to load it"
            )
        return cls(**data)


def cache_root() -> Path:
    """Where sigmatune keeps what it computes or downloads: $SIGMATUNE_CACHE, else ~/.cache/sigmatune."""
    return Path(os.environ.get("SIGMATUNE_CACHE") or Path.home() / ".cache" / "sigmatune").expanduser()


def name_matches(name: str, key: str) -> bool:
    """True when a module name equals key or ends with '.' + key (PEFT's rule for target names)."""
    return name == key or name.endswith("." + key)


def _check_choice(field_name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{field_name} must be one of {list(choices)}, got {value!r}")


def _check_structure(structure, band, update: str) -> None:
    _check_choice("structure", structure, STRUCTURES)
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be an int ≥ 0 (the band's half-width), got {band!r}")
    if structure != "band" and band:
        raise ValueError(f"band={band} is the half-width of a band: set structure='band' (or leave band=0)")
    structure_of(structure, band).check_rule(update_rule(update))


def _check_rank(rank) -> None:
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")


def _check_targets(targets) -> None:
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"target_modules {targets!r} is not a valid regex: {err}") from None
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            "target_modules must be 'all-linear', a regex string, or a non-empty list of module names, "
            f"got {targets!r}"
        )


def _check_selection(selection) -> None:
    if isinstance(selection, str):
        _check_choice("selection", selection, SELECTIONS)
        return
    lists = selection.values() if isinstance(selection, dict) else [selection]
    if not isinstance(selection, (list, dict)) or not selection:
        raise ValueError(
            "selection must be 'principal', 'minor', a list of singular-value indices, or a dict from "
            f"layer name to such a list, got {selection!r}"
        )
    for indices in lists:
        if (
            not isinstance(indices, (list, tuple))
            or not indices
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
        ):
            raise ValueError(f"selection indices must be a non-empty list of ints ≥ 0, got {indices!r}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"selection indices must not repeat, got {list(indices)}")
