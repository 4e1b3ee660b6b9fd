"""sigmatune: parameter-efficient fine-tuning by singular-value scaling.

Each target layer W = U diag(σ) Vᵀ stays frozen; only a vector over its singular values trains.
This module is the public API; docs/ARCHITECTURE.md maps the subpackages behind it.
"""

from .core.config import SigmaConfig
from .core.layer import SpectralLinear
from .core.weights import register_dequantizer
from .formats.adapter_file import AdapterRecord, read_adapter
from .formats.base_check import BaseModelMismatchError
from .formats.files import AdapterFileError
from .model.seed import EigenTuneConfig, EigenTunedLayer, get_eigentune_model
from .model.sigma_model import SigmaModel, get_sigma_model
from .serving.bank import AdapterBank
from .training.callbacks import SaveAdapterCallback
from .version import __version__

__all__ = [
    "AdapterBank",
    "AdapterFileError",
    "AdapterRecord",
    "BaseModelMismatchError",
    "EigenTuneConfig",
    "EigenTunedLayer",
    "SaveAdapterCallback",
    "SigmaConfig",
    "SigmaModel",
    "SpectralLinear",
    "__version__",
    "get_eigentune_model",
    "get_sigma_model",
    "read_adapter",
    "register_dequantizer",
]
