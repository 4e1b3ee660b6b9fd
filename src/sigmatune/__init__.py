"""sigmatune: parameter-efficient fine-tuning by singular-value scaling.

Each target layer W = U diag(σ) Vᵀ stays frozen; only a vector over its singular values trains.
"""

from .adapter_file import AdapterRecord, read_adapter
from .bank import AdapterBank
from .base_check import BaseModelMismatchError
from .callbacks import SaveAdapterCallback
from .config import SigmaConfig
from .files import AdapterFileError
from .layer import SpectralLinear
from .model import SigmaModel, get_sigma_model
from .seed import EigenTuneConfig, EigenTunedLayer, get_eigentune_model
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
]
