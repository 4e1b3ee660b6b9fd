"""sigmatune: parameter-efficient fine-tuning by singular-value scaling.

Each target layer W = U diag(σ) Vᵀ stays frozen; only a vector over its singular values trains.
This module is the public API; docs/ARCHITECTURE.md maps the subpackages behind it.
"""

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# The public API, each name imported from its module on first use (PEP 562): `sigmatune --help` and the
# CLI's parsing then run without importing torch or transformers.
_EXPORTS = {
    "AdapterBank": "serving.bank",
    "AdapterFileError": "formats.files",
    "AdapterIdsCollator": "training.collator",
    "AdapterRecord": "formats.adapter_file",
    "AutoSigmaModelForCausalLM": "model.auto",
    "BaseModelMismatchError": "formats.base_check",
    "EigenTuneConfig": "model.eigentune_compat",
    "EigenTunedLayer": "model.eigentune_compat",
    "SaveAdapterCallback": "training.callbacks",
    "SigmaConfig": "core.config",
    "SigmaModel": "model.sigma_model",
    "SpectralLinear": "core.layer",
    "RowsAdamW": "training.rows_adamw",
    "Together": "model.together",
    "get_eigentune_model": "model.eigentune_compat",
    "get_sigma_model": "model.sigma_model",
    "read_adapter": "formats.adapter_file",
    "register_dequantizer": "core.weights",
}

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .core.config import SigmaConfig
    from .core.layer import SpectralLinear
    from .core.weights import register_dequantizer
    from .formats.adapter_file import AdapterRecord, read_adapter
    from .formats.base_check import BaseModelMismatchError
    from .formats.files import AdapterFileError
    from .model.auto import AutoSigmaModelForCausalLM
    from .model.eigentune_compat import EigenTuneConfig, EigenTunedLayer, get_eigentune_model
    from .model.sigma_model import SigmaModel, get_sigma_model
    from .model.together import Together
    from .serving.bank import AdapterBank
    from .training.callbacks import SaveAdapterCallback
    from .training.collator import AdapterIdsCollator
    from .training.rows_adamw import RowsAdamW


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sigmatune' has no attribute {name!r}")
    # ops/ registers the fast paths with the method's op when imported (ops/__init__.py)
    importlib.import_module(".ops", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [  # _EXPORTS and __version__ (a test checks they agree)
    "AdapterBank",
    "AdapterFileError",
    "AdapterIdsCollator",
    "AdapterRecord",
    "AutoSigmaModelForCausalLM",
    "BaseModelMismatchError",
    "EigenTuneConfig",
    "EigenTunedLayer",
    "RowsAdamW",
    "SaveAdapterCallback",
    "SigmaConfig",
    "SigmaModel",
    "SpectralLinear",
    "Together",
    "__version__",
    "get_eigentune_model",
    "get_sigma_model",
    "read_adapter",
    "register_dequantizer",
]
