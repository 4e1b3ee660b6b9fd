"""SigmaModel: a model whose chosen linear layers carry spectral adapters, with a PEFT-like API.

    model = get_sigma_model(AutoModelForCausalLM.from_pretrained(...), SigmaConfig(rank=16))
    ... train ...                      # only the vectors named *.sigma_adapters.* train
    model.save_pretrained("out")       # a few KB: vectors + settings, no weights
    model = SigmaModel.from_pretrained(base, "out")
    plain = model.merge_and_unload()   # the base model's own class, weights merged

The base model is adapted in place (each target layer wrapped by a SpectralLinear; unload() puts the originals
back). Files go through exchange.py; a mixed batch is an AdapterBank's to serve, a Together block's to train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..core.config import SigmaConfig
from ..core.layer import SpectralLinear, unwrapped
from ..core.structures.registry import structure_of
from ..core.targets import find_targets, linear_layers
from ..core.updates import update_rule
from ..core.weights import compute_dtype, linear_shape
from ..formats.adapter_file import write_adapter
from ..formats.model_card import write_model_card
from ..ops import switches  # importing ops registers its fast paths with core's op (ops/__init__.py)
from . import bases, exchange
from . import compress as compression
from .forward import TrainerForward, installed_forward, refuse_adapter_ids


def get_sigma_model(
    model: nn.Module,
    config: SigmaConfig,
    adapter_name: str = "default",
    full_precision_state_dict: dict[str, torch.Tensor] | None = None,
    progress: bool | None = None,
) -> SigmaModel:
    """Wrap a model with one new spectral adapter (trainable, active); the base model is frozen."""
    return SigmaModel(model, config, adapter_name, full_precision_state_dict, progress)


class SigmaModel(nn.Module):
    """A base model with spectral adapters. Unknown attributes are looked up on the base model."""

    def __init__(
        self,
        model: nn.Module,
        config: SigmaConfig | None = None,
        adapter_name: str = "default",
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
        progress: bool | None = None,
    ):
        super().__init__()
        self.base_model = model.requires_grad_(False)
        self.peft_config: dict[str, SigmaConfig] = {}
        self.active_adapter: str | None = None
        self.progress = progress
        self._frozen_adapters: set[str] = set()
        self._fingerprints: dict[str, str] = {}  # layer name → fingerprint of the weight its SVD came from
        self._pinned: set[str] = set()  # layers kept wrapped without adapters (for an AdapterBank)
        self._disabled_kernels: frozenset[str] = frozenset()  # disable_kernels(): beside the environment's
        if config is not None:
            self.add_adapter(adapter_name, config, full_precision_state_dict)
            self.set_adapter(adapter_name)

    # ---- calling the model --------------------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    forward = TrainerForward()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, installed_forward(self, value) if name == "forward" else value)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def generate(self, *args, **kwargs):
        """The base model's generate() (a mixed batch, adapter_ids=..., is an AdapterBank's to serve)."""
        refuse_adapter_ids(kwargs)
        return self.base_model.generate(*args, **kwargs)

    # ---- adapters -------------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        config: SigmaConfig,
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a new adapter on config.target_modules (not active until set_adapter)."""
        self._add(adapter_name, config, self.plan(config), full_precision_state_dict, drop_small=True)

    def plan(self, config: SigmaConfig) -> dict[str, list[int]]:
        """Layer name → the singular-value indices config selects there."""
        layers = linear_layers(self.base_model)
        return {
            name: config.indices_for(name, min(linear_shape(unwrapped(layers[name]))))
            for name in find_targets(self.base_model, config.target_modules)
        }

    def set_adapter(self, adapter_name: str) -> None:
        """Make one adapter active (and trainable, unless it was loaded for inference)."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for layer in self.spectral_layers().values():
            layer.set_adapter(adapter_name if adapter_name in layer.sigma_adapters else None)
        previous, self.active_adapter = self.active_adapter, adapter_name
        self._refresh_trainable({previous, adapter_name} - {None})

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without any adapter get their original module back."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for layer in self.spectral_layers().values():
            if adapter_name in layer.sigma_adapters:
                layer.delete_adapter(adapter_name)
        self._unwrap_empty()
        del self.peft_config[adapter_name]
        self._frozen_adapters.discard(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model computes as the base model alone."""
        layers = self.spectral_layers().values()
        active = {layer: layer.active_adapter for layer in layers}
        try:
            for layer in layers:
                layer.set_adapter(None)
            yield
        finally:
            for layer, name in active.items():
                layer.set_adapter(name)

    def disable_kernels(self, *names: str) -> None:
        """Turn fast paths off for this model (ops/switches.KERNELS names, or "all") beside the environment's
        switch (ops/switches.py); no names: back on. The next backend computes the same up to rounding."""
        self._disabled_kernels = switches.checked(names)
        for layer in self.spectral_layers().values():
            layer.disabled_kernels = self._disabled_kernels

    def spectral_layers(self) -> dict[str, SpectralLinear]:
        return {n: m for n, m in linear_layers(self.base_model).items() if isinstance(m, SpectralLinear)}

    # ---- parameters -------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, adapters included."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the adapters' vectors: the base model's weights belong to the base model."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in full if k.startswith(prefix) and ".sigma_adapters." not in k]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adapter vectors saved by state_dict(); strict checks adapter keys only."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if ".sigma_adapters." in k]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"adapter keys missing: {missing[:5]}; unexpected keys: {result.unexpected_keys[:5]}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, result.unexpected_keys)

    # ---- saving and loading ---------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        save_bases: bool = False,
        is_main_process: bool = True,
        **_ignored,
    ) -> None:
        """Save adapters: "default" in save_directory, any other in save_directory/<name> (as PEFT does):
        one safetensors file each (vectors, their indices, σ there for the base check, the settings) and a
        JSON copy, written atomically, and a model card (README.md; one of the user's own is left alone).
        Bases are recomputed on load (and cached): stored only with save_bases=True. In a torch.distributed
        job call it on every rank (sharded vectors are gathered); rank 0 writes."""
        if dist.is_available() and dist.is_initialized():  # every rank gathers (FSDP shards), rank 0 writes
            is_main_process = is_main_process and dist.get_rank() == 0
        for name in selected_adapters or list(self.peft_config):
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            record = exchange.record_of(self, name, save_bases)
            if is_main_process:
                write_adapter(directory, record)
                write_model_card(directory, record)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
        progress: bool | None = None,
        source: str = "sigmatune",
        basis_config: SigmaConfig | None = None,
        **_ignored,
    ) -> SigmaModel:
        """Wrap a base model with a saved adapter (frozen for inference unless is_trainable). source:
        "sigmatune" (a save_pretrained folder) or "eigentune" (see from_eigentune). basis_config: how bases
        are computed and kept (config.BASIS_EFFORT; default SigmaConfig()'s): the caller's, never the file's."""
        sigma_model = cls(model, progress=progress)
        sigma_model.load_adapter(
            model_id, adapter_name, is_trainable, full_precision_state_dict, source, basis_config
        )
        sigma_model.set_adapter(adapter_name)
        return sigma_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
        source: str = "sigmatune",
        basis_config: SigmaConfig | None = None,
    ) -> None:
        """Add a saved adapter (of sigmatune, or of eigentune) under adapter_name, after checking it fits
        this base model; missing bases are computed as basis_config says (as in from_pretrained)."""
        exchange.reader(source)(self, model_id, adapter_name, full_precision_state_dict, basis_config)
        if not is_trainable:
            self._frozen_adapters.add(adapter_name)
        self._refresh_trainable({adapter_name})

    @classmethod
    def from_eigentune(cls, model: nn.Module, path: str | Path, **options) -> SigmaModel:
        """Import an adapter of the peer package eigentune: a 0.2.0 save_adapter folder, or the 0.1.0 seed's
        trained vectors (`*.delta_s` entries, safetensors), checked against eigentune's basis signatures where
        the file has them. options as in from_pretrained."""
        return cls.from_pretrained(model, path, source="eigentune", **options)

    def export_lora(
        self,
        save_directory: str | Path,
        adapter_name: str | None = None,
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Write the adapter (default: the active one) as a PEFT LoRA folder, mathematically equal:
        B = U_S diag(δ_S), A = V_Sᵀ per layer, lora_alpha = r. Returns r."""
        return exchange.export_lora(
            self, save_directory, adapter_name or self.active_adapter, full_precision_state_dict
        )

    def compress(
        self, rank: int, adapter_name: str | None = None, new_name: str | None = None, calibration=None
    ):
        """Add an adapter (new_name, default "<adapter>-r<rank>") over the `rank` directions per layer that
        carry most of adapter_name's update (default: the active one); returns what it kept
        (model/compress.py). With calibration (a few unpadded batches of model inputs) the directions are
        weighed by the update's effect on that data's activations, which keeps more."""
        adapter_name = adapter_name or self.active_adapter
        name = new_name or f"{adapter_name}-r{rank}"
        return compression.compress(self, rank, adapter_name, name, calibration)

    # ---- merging --------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold the active adapter into the base weights (W ← W + U_S diag(δ_S) V_Sᵀ); idempotent."""
        for layer in self.spectral_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        """Undo merge(); idempotent."""
        for layer in self.spectral_layers().values():
            layer.unmerge()

    def merge_and_unload(self, requantize: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """The base model with the active adapter merged and every wrapper removed (its own class).

        Quantized base layers come back dense (merged from their dequantized weights), or passed
        through requantize(layer) → layer when given."""
        self.merge()
        if requantize is not None:
            for layer in self.spectral_layers().values():
                if layer._quantized_base is not None:
                    layer.base_layer = requantize(layer.base_layer)
        return self._unwrap_all()

    def unload(self) -> nn.Module:
        """The base model as it was: adapters unmerged and every wrapper removed."""
        self.unmerge()
        return self._unwrap_all()

    # ---- internals --------------------------------------------------------------------------------

    def ensure_bases(
        self,
        config: SigmaConfig,
        plan: dict[str, list[int]],
        full_precision_state_dict: dict[str, torch.Tensor] | None = None,
        pin: bool = False,
    ) -> None:
        """Make every layer in plan (name → singular-value indices) a SpectralLinear storing at least those
        directions: wrap it, or extend its basis; bases come from the cache or a batched SVD. Pinned
        layers stay wrapped without adapters (an AdapterBank serves from them)."""
        layers = linear_layers(self.base_model)
        if any(getattr(layer, "merged_adapter", None) for layer in layers.values()):
            raise ValueError("unmerge() before adding adapters: bases must come from the unmerged weights")
        requests = bases.missing_spectra(layers, plan, config, full_precision_state_dict)
        self._fingerprints.update({request.name: request.fingerprint for request in requests})
        spectra = bases.compute(requests, config, self.progress)
        model_dtype = self._float_dtype()  # for quantized layers that declare no compute dtype
        for name, spectrum in spectra.items():
            layer = layers[name]
            if isinstance(layer, SpectralLinear):
                layer.extend_spectrum(spectrum)
            else:
                dtype = config.torch_dtype or compute_dtype(layer, fallback=model_dtype)
                wrapped = SpectralLinear(layer, spectrum, dtype)
                wrapped.disabled_kernels = self._disabled_kernels
                self._replace(name, wrapped)
        if pin:
            self._pinned.update(plan)

    def _add(self, adapter_name, config, plan, full_precision_state_dict, drop_small: bool) -> None:
        """Bases for the plan (wrapping or extending layers), then the adapter's vectors. With drop_small,
        directions the update rule cannot use (σ too small, for additive) leave the plan first; a saved
        adapter's plan is what it was trained on, and is loaded as it is."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name"
            )
        try:
            self.ensure_bases(config, plan, full_precision_state_dict)
            spectral = self.spectral_layers()
            if drop_small and update_rule(config.update).drops_small_sigma:
                plan = bases.without_small_sigma(adapter_name, plan, spectral, config.sigma_tol)
            structure = structure_of(config.structure, config.band)
            for name, indices in plan.items():
                structure.check(len(indices), name)
                spectral[name].add_adapter(
                    adapter_name, indices, config.update, config.init, config.init_std, structure
                )
        except BaseException:
            for layer in self.spectral_layers().values():
                if adapter_name in layer.sigma_adapters:
                    layer.delete_adapter(adapter_name)
            self._unwrap_empty()
            raise
        self.peft_config[adapter_name] = config
        self._refresh_trainable({adapter_name})

    def _refresh_trainable(self, names: set[str]) -> None:
        """The named adapters' vectors train if active and not loaded for inference (only those: fast with many)."""
        for layer in self.spectral_layers().values():
            for name in names & layer.sigma_adapters.keys():
                train = name == self.active_adapter and name not in self._frozen_adapters
                layer.sigma_adapters[name].vector.requires_grad_(train)

    def _float_dtype(self) -> torch.dtype | None:
        """The dtype of the base model's float parameters (embeddings, norms): what a quantized layer
        that declares no compute dtype (bitsandbytes int8) computes in."""
        return next((p.dtype for p in self.base_model.parameters() if p.is_floating_point()), None)

    def _replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name), child, module)

    def _unwrap_empty(self) -> None:
        """Give every layer left without adapters its original module back."""
        for name, layer in self.spectral_layers().items():
            if not layer.sigma_adapters and name not in self._pinned:
                self._replace(name, layer.base_layer)
                self._fingerprints.pop(name, None)

    def _unwrap_all(self) -> nn.Module:
        for name, layer in self.spectral_layers().items():
            self._replace(name, layer.base_layer)
        self._pinned.clear()
        self.peft_config.clear()
        self._fingerprints.clear()
        self.active_adapter = None
        return self.base_model
