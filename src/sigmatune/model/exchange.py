"""Adapters in and out of a SigmaModel: sigmatune's own files, PEFT LoRA folders, eigentune adapters.

Functions of a SigmaModel (passed in; this module does not import sigma_model.py, which calls it). The
file formats themselves are in formats/; here they meet a model: records are built from its layers,
loaded adapters are checked against it, and a load that fails leaves it as it was.
"""

from __future__ import annotations

import hashlib
import warnings

import torch

from ..core.config import SigmaConfig
from ..core.targets import linear_layers, linear_shapes
from ..core.weights import svd_source
from ..formats.adapter_file import AdapterRecord, LayerRecord, read_adapter
from ..formats.base_check import BaseModelMismatchError, check_spectra, check_structure
from ..formats.interop import eigentune_signature, read_eigentune, write_peft_lora
from ..version import __version__

LARGE_LORA_RANK = 256  # exports above this rank get a warning about their size
SIGNATURE_TOLERANCE = 1e-2  # eigentune basis signatures may differ this much (relative) on the same base


def record_of(model, adapter_name: str, save_bases: bool) -> AdapterRecord:
    """What save_pretrained writes for one adapter."""
    if adapter_name not in model.peft_config:
        raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    layers = {}
    for name, layer in model.spectral_layers().items():
        if adapter_name not in layer.sigma_adapters:
            continue
        columns = layer.columns(adapter_name)
        vector = layer.sigma_adapters[adapter_name].vector.detach()
        if hasattr(vector, "full_tensor"):  # a DTensor shard (FSDP2): gather the whole vector
            vector = vector.full_tensor()
        layers[name] = LayerRecord(
            vector=vector,
            indices=layer.sigma_adapters[adapter_name].indices,
            sigma=layer.sigma_values[columns],
            out_features=layer.out_features,
            in_features=layer.in_features,
            basis=layer.sigma_basis[:, columns] if save_bases else None,
        )
    prints = "|".join(f"{name}:{model._fingerprints.get(name)}" for name in sorted(layers))
    return AdapterRecord(
        config=model.peft_config[adapter_name],
        layers=layers,
        base_model_name_or_path=_base_name(model),
        base_fingerprint=hashlib.sha256(prints.encode()).hexdigest()[:32],
        info={"sigmatune_version": __version__},
    )


def load_saved(model, model_id, adapter_name: str, full_precision_state_dict=None, basis_config=None) -> None:
    """Add a saved sigmatune adapter, after checking it fits the base model. The file gives the adapter's
    math; how missing bases are computed and kept is basis_config's (a SigmaConfig; default: the defaults)."""
    record = read_adapter(model_id)
    check_structure(model_id, record, model.base_model)
    plan = {name: layer.indices.tolist() for name, layer in record.layers.items()}
    config = record.config.with_effort_of(basis_config)
    model._add(adapter_name, config, plan, full_precision_state_dict, drop_small=False)
    try:
        check_spectra(model_id, record, model.spectral_layers())
        _fill(
            model, adapter_name, {name: (plan[name], saved.vector) for name, saved in record.layers.items()}
        )
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def load_eigentune(model, path, adapter_name: str, full_precision_state_dict=None, basis_config=None) -> None:
    """Add an eigentune 0.2.0 adapter folder or 0.1.0 state dict."""
    sizes = {name: min(shape) for name, shape in linear_shapes(model.base_model).items()}
    foreign = read_eigentune(path, sizes)
    plan = {name: indices for name, (indices, _) in foreign.layers.items()}
    config = SigmaConfig(
        rank=max(len(i) for i in plan.values()),
        target_modules=list(plan),
        selection=plan,
        update=foreign.update,
    ).with_effort_of(basis_config)
    model._add(adapter_name, config, plan, full_precision_state_dict, drop_small=True)
    try:
        spectral = model.spectral_layers()
        for name, signature in foreign.signatures.items():
            weight = svd_source(name, spectral[name].base_layer, full_precision_state_dict)
            now = eigentune_signature(*spectral[name].singular_vectors(len(signature) // 2, weight))
            saved = torch.tensor(signature)
            if float((now - saved).abs().max()) > SIGNATURE_TOLERANCE * max(1.0, float(saved.abs().max())):
                raise BaseModelMismatchError(
                    f"{path}: layer {name!r} has other singular vectors than the base this {foreign.source} adapter was "
                    "trained on; load it onto that model"
                )
        _fill(model, adapter_name, foreign.layers)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


READERS = {"sigmatune": load_saved, "eigentune": load_eigentune}  # SigmaModel.load_adapter's sources


def reader(source: str):
    """The loader of an adapter source ("sigmatune" or "eigentune"); a ValueError lists them."""
    if source not in READERS:
        raise ValueError(f"source must be one of {list(READERS)}, got {source!r}")
    return READERS[source]


def export_lora(model, directory, adapter_name: str, full_precision_state_dict=None) -> int:
    """Write the adapter as an exactly equal PEFT LoRA folder; returns its rank."""
    spectral = {
        n: layer for n, layer in model.spectral_layers().items() if adapter_name in layer.sigma_adapters
    }
    if not spectral:
        raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    factors = {
        name: layer.lora_factors(adapter_name, svd_source(name, layer.base_layer, full_precision_state_dict))
        for name, layer in spectral.items()
    }
    rank = max(a.shape[0] for a, _ in factors.values())
    if rank > LARGE_LORA_RANK:
        size = sum(rank * (a.shape[1] + b.shape[0]) for a, b in factors.values()) * 4
        warnings.warn(
            f"exporting a rank-{rank} LoRA ({size / 2**20:.0f} MiB): full-spectrum adapters are large as LoRA",
            stacklevel=3,
        )
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in spectral.values())
    return write_peft_lora(directory, factors, _target_names(model, spectral), _loadable_name(model), conv1d)


def _fill(model, adapter_name: str, values: dict) -> None:
    """Copy values (layer → (indices, vector over them)) into the adapter, for the indices it kept."""
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            if name not in values or adapter_name not in layer.sigma_adapters:
                continue
            indices, vector = values[name]
            where = {index: position for position, index in enumerate(indices)}
            target = layer.sigma_adapters[adapter_name]
            kept = torch.tensor([where[i] for i in target.indices.tolist()])
            target.vector.copy_(vector.to(target.vector)[..., kept.to(target.vector.device)])


def _target_names(model, spectral: dict) -> list[str]:
    """LoRA target_modules: module suffixes when the adapter covers every layer of those kinds, else full names."""
    kinds = {name.rsplit(".", 1)[-1] for name in spectral}
    every = {name for name in linear_layers(model.base_model) if name.rsplit(".", 1)[-1] in kinds}
    return sorted(kinds) if every == set(spectral) else sorted(spectral)


def _loadable_name(model) -> str | None:
    """The base model as transformers loaded it (a folder or a hub name: what PEFT's from_pretrained can
    load), else the name it was given. A LoRA folder is read by tools that know no sigmatune alias."""
    loaded = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    return loaded or _base_name(model)


def _base_name(model) -> str | None:
    """The base model's name as whoever loaded it gave it (`sigmatune_base_name`, set by sigmatune's
    loaders: "smollm2", a hub name or an absolute path, never a cache folder), else its config's."""
    given = getattr(model.base_model, "sigmatune_base_name", None)
    return given or getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
