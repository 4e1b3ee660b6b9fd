"""The adapter file format: one safetensors file that carries its own settings, and a JSON copy.

    <dir>/sigma_adapter.safetensors   per layer L:  L.vector (r,) float32   the trained vector (another
                                                                        structure's shape: a band's
                                                                        diagonals (2b+1, r), M (r, r))
                                                  L.indices (r,) int64   its singular-value indices
                                                  L.sigma (r,) float32   σ at those indices (base check)
                                                  L.basis (d, r)         only when saved with bases
                                      metadata "sigmatune": the JSON of AdapterRecord.header()
                                               "sigmatune_sha256": its checksum (files.checksummed)
    <dir>/sigma_config.json           the same JSON, for people and tools; the safetensors is the truth

One file holds everything, so one atomic rename saves an adapter: a crash leaves the old one or the
new one. Reading trusts nothing in the file: it refuses links out of the folder, checks every declared
dtype and shape against the header before reading a byte of data, then the checksum (a damaged file),
then every value (indices sorted and in range, σ ≥ 0, all finite) and the settings against the tensors.
Whether the adapter fits the base model is checked where it is loaded onto one (base_check.py).
The file's meaning of `vector` (δ or g) is the update rule named in its settings (core/updates.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import BASIS_EFFORT, SigmaConfig
from ..core.structures.base import Structure
from ..core.structures.registry import STRUCTURES, structure_of
from ..core.svd import basis_rows
from .files import (
    CHECKSUM,
    AdapterFileError,
    atomic_save_tensors,
    atomic_write_json,
    check_digest,
    check_inside,
    checksummed,
    load_tensors,
    read_json,
)

FORMAT = "sigmatune"
FORMAT_VERSION = 3  # 2: the checksum is required (version-1 files, which have none, still load);
# 3: the settings name a structure, the vector has its shape (a band's (2b+1, r); version-2 files are diagonal)
STRUCTURES_VERSION = 3
WEIGHTS_NAME = "sigma_adapter.safetensors"
CONFIG_NAME = "sigma_config.json"
LAYER_TENSORS = ("vector", "indices", "sigma")
MAX_HEADER_BYTES = 16 * 2**20  # a real header (settings, layer shapes, explicit indices) is far smaller


@dataclass
class LayerRecord:
    """One layer of a saved adapter."""

    vector: torch.Tensor  # (r,) float32: δ (additive) or g (multiplicative); a band: (2b+1, r), M's diagonals
    indices: torch.Tensor  # (r,) int64, sorted
    sigma: torch.Tensor  # (r,) σ of the base at those indices when it was trained
    out_features: int
    in_features: int
    basis: torch.Tensor | None = None  # (d, r), only when saved with bases


@dataclass
class AdapterRecord:
    """A whole saved adapter: its settings, where it came from, and its layers."""

    config: SigmaConfig
    layers: dict[str, LayerRecord]
    base_model_name_or_path: str | None = None
    base_fingerprint: str | None = None
    info: dict = field(default_factory=dict)  # sigmatune version and other facts, informational

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.adapter_settings(),  # the math only: how bases are found is the loader's
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_fingerprint": self.base_fingerprint,
            "layers": {name: [rec.out_features, rec.in_features] for name, rec in self.layers.items()},
            **self.info,
        }


def write_adapter(directory: str | Path, record: AdapterRecord) -> None:
    """Save an adapter: refuse non-finite vectors, then write the safetensors file and the JSON copy."""
    directory = Path(directory)
    tensors = {}
    for name, layer in record.layers.items():
        if not torch.isfinite(layer.vector).all():
            raise ValueError(
                f"refusing to save: the trained vector of layer {name!r} holds NaN or Inf; training diverged "
                "(lower the learning rate) — the adapter on disk was left as it was"
            )
        tensors[f"{name}.vector"] = layer.vector.float()
        tensors[f"{name}.indices"] = layer.indices.long()
        tensors[f"{name}.sigma"] = layer.sigma.float()
        if layer.basis is not None:
            tensors[f"{name}.basis"] = layer.basis
    header = record.header()
    metadata = checksummed(FORMAT, json.dumps(header), tensors)
    atomic_save_tensors(directory / WEIGHTS_NAME, tensors, metadata=metadata)
    atomic_write_json(directory / CONFIG_NAME, header)


def read_adapter(directory: str | Path) -> AdapterRecord:
    """Load and check a saved adapter; every problem is an AdapterFileError naming the file."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise AdapterFileError(directory, "is not an adapter folder (it does not exist or is a file)")
    if not path.exists() and (directory / "adapter_config.json").exists():
        raise AdapterFileError(directory, "holds a PEFT adapter, not a sigmatune one", "load it with peft")
    if not path.exists() and (directory / "model.safetensors").exists():
        raise AdapterFileError(
            directory,
            f"holds no {WEIGHTS_NAME}, only a Trainer checkpoint of the vectors (model.safetensors)",
            "wrap the base with the same SigmaConfig and call model.load_state_dict(safetensors.torch.load_file("
            "'<dir>/model.safetensors')), or train with callbacks=[sigmatune.SaveAdapterCallback()]",
        )
    if path.is_symlink():
        check_inside(directory, path)
    tensors, metadata = load_tensors(
        path, check=lambda meta, declared: _check_declared(path, meta, declared), max_header=MAX_HEADER_BYTES
    )
    header = _parse_header(path, metadata)
    _check_checksum(path, header, metadata, tensors)
    config_path = directory / CONFIG_NAME
    if config_path.is_symlink():
        check_inside(directory, config_path)
    if config_path.exists() and read_json(config_path) != header:
        warnings.warn(
            f"{config_path} differs from the settings inside {WEIGHTS_NAME} (edited by hand, or left by an "
            "interrupted save); using the ones inside the safetensors file",
            stacklevel=2,
        )
    config = _config(path, header)
    layers = {name: _layer(path, name, shape, config, tensors) for name, shape in header["layers"].items()}
    info = {k: v for k, v in header.items() if k not in ("format", "format_version", "config", "layers")}
    return AdapterRecord(
        config=config,
        layers=layers,
        base_model_name_or_path=_text_or_none(path, info.pop("base_model_name_or_path", None)),
        base_fingerprint=_text_or_none(path, info.pop("base_fingerprint", None)),
        info=info,
    )


def _parse_header(path: Path, metadata: dict) -> dict:
    if FORMAT not in metadata:
        raise AdapterFileError(
            path, "has no sigmatune header", "it was not written by sigmatune's save_pretrained"
        )
    try:
        header = json.loads(metadata[FORMAT])
    except (json.JSONDecodeError, RecursionError) as err:
        raise AdapterFileError(path, f"has a damaged header ({str(err)[:120]})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AdapterFileError(path, "has a header of another format")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterFileError(path, f"has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            path,
            f"uses format version {version}; this sigmatune reads up to {FORMAT_VERSION}",
            "upgrade sigmatune",
        )
    layers = header.get("layers")
    if not isinstance(header.get("config"), dict) or not isinstance(layers, dict):
        raise AdapterFileError(path, "has a header without 'config' and 'layers'")
    if not layers:
        raise AdapterFileError(path, "lists no layers")
    for name, shape in layers.items():
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**31 for s in shape)
        ):
            raise AdapterFileError(path, f"gives layer {name!r} an invalid shape {shape!r}")
    return header


def _check_declared(path: Path, metadata: dict, declared: dict[str, tuple[str, list[int]]]) -> None:
    """Every tensor the file declares, by name, dtype and shape, against the header — before reading."""
    header = _parse_header(path, metadata)
    structure = _structure(path, header)  # the vector over r directions is structure.shape(r)
    expected = {}
    for name, (out_features, in_features) in header["layers"].items():
        k, d = min(out_features, in_features), basis_rows(out_features, in_features)
        vector_shape = declared.get(f"{name}.vector", (None, None))[1]
        if vector_shape is None:
            raise AdapterFileError(path, f"lacks {name}.vector", "the file is incomplete; re-save it")
        r = vector_shape[-1] if vector_shape else 0
        if not 1 <= r <= k or vector_shape != list(structure.shape(r)):
            raise AdapterFileError(
                path,
                f"declares {name}.vector as {vector_shape}; a {structure.name} adapter's is "
                f"{list(structure.shape('r'))} with 1 ≤ r ≤ min(in, out) = {k}",
            )
        expected[f"{name}.vector"] = ({"F32"}, list(structure.shape(r)))
        expected[f"{name}.indices"] = ({"I64"}, [r])
        expected[f"{name}.sigma"] = ({"F32"}, [r])
        expected[f"{name}.basis"] = ({"F32", "F64", "BF16", "F16"}, [d, r])
    for name, (dtype, shape) in declared.items():
        if name not in expected:
            raise AdapterFileError(path, f"holds a tensor {name!r} of no listed layer")
        dtypes, want = expected[name]
        if dtype not in dtypes or shape != want:
            raise AdapterFileError(
                path, f"declares {name!r} as {dtype} {shape}; expected {'/'.join(sorted(dtypes))} {want}"
            )
    missing = sorted(n for n in expected if n not in declared and not n.endswith(".basis"))
    if missing:
        raise AdapterFileError(path, f"lacks {missing[:3]}", "the file is incomplete; re-save it")


def _structure(path: Path, header: dict) -> Structure:
    """The structure the settings name. Files before version 3 hold diagonals only: one of them that names
    another structure was not written by sigmatune (a downgrade that skips checks)."""
    config = header["config"]
    structure, band = config.get("structure", "diagonal"), config.get("band", 0)
    if structure == "diagonal" and band == 0:
        return structure_of("diagonal")
    if header["format_version"] < STRUCTURES_VERSION:
        raise AdapterFileError(
            path,
            f"names a {structure!r} structure in format version {header['format_version']}, which holds "
            f"diagonal adapters only (structures came with version {STRUCTURES_VERSION})",
            "the file was altered; save the adapter again",
        )
    bad_band = isinstance(band, bool) or not isinstance(band, int) or not 0 <= band < 2**20
    if structure not in STRUCTURES or bad_band or (structure != "band" and band):
        raise AdapterFileError(path, f"holds invalid settings (structure {structure!r}, band {band!r})")
    return structure_of(structure, band)


def _check_checksum(path: Path, header: dict, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    if CHECKSUM in metadata:
        check_digest(path, metadata, FORMAT, tensors)
    elif header["format_version"] >= 2:
        raise AdapterFileError(path, "has no checksum", "the file was damaged or not written by sigmatune")


def _config(path: Path, header: dict) -> SigmaConfig:
    """The adapter's math settings; how bases are computed and kept (BASIS_EFFORT: older files record it)
    is the loader's to choose, so it is dropped here, before anything can act on it."""
    settings = {name: value for name, value in header["config"].items() if name not in BASIS_EFFORT}
    try:
        return SigmaConfig.from_dict(settings)
    except (TypeError, ValueError, RecursionError) as err:
        raise AdapterFileError(path, f"holds invalid settings ({str(err)[:200]})") from None


def _layer(
    path: Path, name: str, shape: list[int], config: SigmaConfig, tensors: dict[str, torch.Tensor]
) -> LayerRecord:
    """Values of one layer (dtypes and shapes were checked before reading): indices sorted, unique, in
    range and among those the settings select; σ ≥ 0; everything finite."""
    vector, indices, sigma = (tensors[f"{name}.{part}"] for part in LAYER_TENSORS)
    basis = tensors.get(f"{name}.basis")
    out_features, in_features = shape
    k = min(out_features, in_features)
    problem = None
    if not (
        bool((indices >= 0).all()) and bool((indices < k).all()) and bool((indices[1:] > indices[:-1]).all())
    ):
        problem = f"singular-value indices that are not sorted, unique and within 0..{k - 1}"
    elif not (torch.isfinite(vector).all() and torch.isfinite(sigma).all()):
        problem = "NaN or Inf values"
    elif not bool((sigma >= 0).all()):
        problem = "negative singular values"
    elif basis is not None and not torch.isfinite(basis).all():
        problem = "a basis with NaN or Inf"
    elif not _selected_by(config, name, k, indices.tolist()):
        problem = f"singular-value indices {indices.tolist()[:5]}… that its settings (rank {config.rank!r}) do not select"
    if problem:
        raise AdapterFileError(path, f"layer {name!r} has {problem}")
    return LayerRecord(vector, indices, sigma, out_features, in_features, basis)


def _selected_by(config: SigmaConfig, name: str, k: int, indices: list[int]) -> bool:
    """Whether the settings select these indices (a subset: additive adapters drop directions with tiny σ)."""
    try:
        return set(indices) <= set(config.indices_for(name, k))
    except ValueError:
        return False


def _text_or_none(path: Path, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AdapterFileError(path, f"has a header field of the wrong type ({type(value).__name__})")
    return value
