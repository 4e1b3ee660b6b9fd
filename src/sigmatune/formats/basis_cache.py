"""The basis cache: computed spectra on disk, so the second initialisation of a model reads its bases.

    <cache_dir>/<sha256(key)[:40]>.safetensors   basis (d, r), sigma (r,), indices (r,), sigma_max ()
                                                  metadata "key": CACHE_VERSION | svd.spectrum_key(...)

The key (core/svd.py) names the weight by its fingerprint, the side, the method, the dtype and the
selected indices, so a changed weight or selection is another file. A file that is damaged or does not
fit its request is ignored with a warning and recomputed; a cache that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from ..core.svd import Spectrum, SpectrumRequest, basis_rows
from .files import AdapterFileError, atomic_save_tensors, load_tensors

CACHE_VERSION = "sigmatune-basis-v1"
FIELDS = ("basis", "sigma", "indices", "sigma_max")


class BasisCache:
    """A folder of cached spectra (svd.SpectrumCache)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def read(self, key: str, request: SpectrumRequest) -> Spectrum | None:
        path = self._file(key)
        if not path.exists():
            return None
        try:
            tensors, metadata = load_tensors(path)
            spectrum = Spectrum(**{name: tensors[name] for name in FIELDS})
            _check(spectrum, metadata, self._full_key(key), request)
        except (AdapterFileError, KeyError, ValueError) as err:
            warnings.warn(f"ignoring a damaged basis cache file ({err}); recomputing it", stacklevel=3)
            return None
        device = request.weight.device
        return Spectrum(**{name: getattr(spectrum, name).to(device) for name in FIELDS})

    def write(self, key: str, spectrum: Spectrum) -> None:
        tensors = {name: getattr(spectrum, name) for name in FIELDS}
        try:
            atomic_save_tensors(self._file(key), tensors, metadata={"key": self._full_key(key)})
        except OSError as err:
            warnings.warn(
                f"could not write the basis cache in {self.folder} ({err}); continuing without it",
                stacklevel=3,
            )

    def _full_key(self, key: str) -> str:
        return f"{CACHE_VERSION}|{key}"

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(self._full_key(key).encode()).hexdigest()[:40]}.safetensors"


def _check(spectrum: Spectrum, metadata: dict, key: str, request: SpectrumRequest) -> None:
    d, r = basis_rows(*request.weight.shape), len(request.indices)
    if metadata.get("key") != key:
        raise ValueError("its key does not match")
    if (
        spectrum.basis.shape != (d, r)
        or spectrum.sigma.shape != (r,)
        or spectrum.indices.tolist() != request.indices
    ):
        raise ValueError(f"its shapes do not match the layer {request.name!r}")
    if not (torch.isfinite(spectrum.basis).all() and torch.isfinite(spectrum.sigma).all()):
        raise ValueError("it holds NaN or Inf")
