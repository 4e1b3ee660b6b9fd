"""The adapter file format: one safetensors file that carries its own settings, and a JSON copy.

    <dir>/sigma_adapter.safetensors   per layer L:  L.vector (r,) float32   the trained vector
                                                  L.indices (r,) int64   its singular-value indices
                                                  L.sigma (r,) float32   σ at those indices (base check)
                                                  L.basis (d, r)         only when saved with bases
                                      metadata "sigmatune": the JSON of AdapterHeader
    <dir>/sigma_config.json           the same JSON, for people and tools; the safetensors is the truth

One file holds everything, so one atomic rename saves an adapter: a crash leaves the old one or the
new one. Reading checks every tensor's name, dtype, shape, range and finiteness before use.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SigmaConfig
from .files import AdapterFileError, atomic_save_tensors, atomic_write_json, load_tensors, read_json

FORMAT = "sigmatune"
FORMAT_VERSION = 1
WEIGHTS_NAME = "sigma_adapter.safetensors"
CONFIG_NAME = "sigma_config.json"
LAYER_TENSORS = ("vector", "indices", "sigma")


@dataclass
class LayerRecord:
    """One layer of a saved adapter."""

    vector: torch.Tensor  # (r,) float32: δ (additive) or g (multiplicative)
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
            "config": self.config.to_dict(),
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
    atomic_save_tensors(directory / WEIGHTS_NAME, tensors, metadata={FORMAT: json.dumps(header)})
    atomic_write_json(directory / CONFIG_NAME, header)


def read_adapter(directory: str | Path) -> AdapterRecord:
    """Load and check a saved adapter; every problem is an AdapterFileError naming the file."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.exists() and (directory / "adapter_config.json").exists():
        raise AdapterFileError(directory, "holds a PEFT adapter, not a sigmatune one", "load it with peft")
    if not path.exists() and (directory / "model.safetensors").exists():
        raise AdapterFileError(
            directory,
            f"holds no {WEIGHTS_NAME}, only a Trainer checkpoint of the vectors (model.safetensors)",
            "wrap the base with the same SigmaConfig and call model.load_state_dict(safetensors.torch.load_file("
            "'<dir>/model.safetensors')), or train with callbacks=[sigmatune.SaveAdapterCallback()]",
        )
    tensors, metadata = load_tensors(path)
    header = _parse_header(path, metadata)
    config_path = directory / CONFIG_NAME
    if config_path.exists() and read_json(config_path) != header:
        warnings.warn(
            f"{config_path} differs from the settings inside {WEIGHTS_NAME} (edited by hand, or left by an "
            "interrupted save); using the ones inside the safetensors file",
            stacklevel=2,
        )
    try:
        config = SigmaConfig.from_dict(header["config"])
    except (TypeError, ValueError) as err:
        raise AdapterFileError(path, f"holds invalid settings ({err})") from None
    layers = {name: _layer(path, name, shape, tensors) for name, shape in header["layers"].items()}
    expected = {f"{name}.{part}" for name in layers for part in (*LAYER_TENSORS, "basis")}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterFileError(path, f"holds tensors of no listed layer: {unexpected[:5]}")
    if not layers:
        raise AdapterFileError(path, "lists no layers")
    info = {k: v for k, v in header.items() if k not in ("format", "format_version", "config", "layers")}
    return AdapterRecord(
        config=config,
        layers=layers,
        base_model_name_or_path=info.pop("base_model_name_or_path", None),
        base_fingerprint=info.pop("base_fingerprint", None),
        info=info,
    )


def _parse_header(path: Path, metadata: dict) -> dict:
    if FORMAT not in metadata:
        raise AdapterFileError(
            path, "has no sigmatune header", "it was not written by sigmatune's save_pretrained"
        )
    try:
        header = json.loads(metadata[FORMAT])
    except json.JSONDecodeError as err:
        raise AdapterFileError(path, f"has a damaged header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AdapterFileError(path, "has a header of another format")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
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
    for name, shape in layers.items():
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
        ):
            raise AdapterFileError(path, f"gives layer {name!r} an invalid shape {shape!r}")
    return header


def _layer(path: Path, name: str, shape: list[int], tensors: dict[str, torch.Tensor]) -> LayerRecord:
    missing = [part for part in LAYER_TENSORS if f"{name}.{part}" not in tensors]
    if missing:
        raise AdapterFileError(
            path, f"lacks {missing} for layer {name!r}", "the file is incomplete; re-save it"
        )
    vector, indices, sigma = (tensors[f"{name}.{part}"] for part in LAYER_TENSORS)
    basis = tensors.get(f"{name}.basis")
    out_features, in_features = shape
    k = min(out_features, in_features)
    r = vector.shape[0] if vector.dim() == 1 else -1
    problem = None
    if not (vector.is_floating_point() and sigma.is_floating_point() and indices.dtype == torch.int64):
        problem = "wrong dtypes (vector and sigma must be float, indices int64)"
    elif not (1 <= r <= k and indices.shape == (r,) and sigma.shape == (r,)):
        problem = (
            f"inconsistent shapes {[tuple(t.shape) for t in (vector, indices, sigma)]} for min(in, out) = {k}"
        )
    elif not (
        bool((indices >= 0).all()) and bool((indices < k).all()) and bool((indices[1:] > indices[:-1]).all())
    ):
        problem = f"singular-value indices that are not sorted, unique and within 0..{k - 1}"
    elif not (torch.isfinite(vector).all() and torch.isfinite(sigma).all()):
        problem = "NaN or Inf values"
    elif basis is not None and (
        basis.shape != (in_features if in_features <= out_features else out_features, r)
        or not torch.isfinite(basis).all()
    ):
        problem = f"a basis of shape {tuple(basis.shape)} or with NaN/Inf"
    if problem:
        raise AdapterFileError(path, f"layer {name!r} has {problem}")
    return LayerRecord(vector.float(), indices, sigma.float(), out_features, in_features, basis)
