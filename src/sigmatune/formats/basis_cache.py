"""The basis cache: computed spectra on disk, so the second initialisation of a model reads its bases.

    <cache_dir>/<sha256(keys)[:40]>.safetensors   for layer i of the request: i.basis (d, r), i.sigma (r,),
                                                   i.indices (r,), i.sigma_max (); metadata "keys": the JSON
                                                   list of CACHE_VERSION | svd.spectrum_key(...) per layer

One file holds every layer that one initialisation computed (a model's bases are read back in one file,
not one per layer). Each key (core/svd.py) names a weight by its fingerprint, the side, the method, the
dtype and the selected indices, so a changed weight or selection is another file. A file that is damaged
or does not fit its request is ignored with a warning and recomputed; a cache that cannot be written is
skipped. Writes are atomic but not fsynced: a crash may lose the cache, never tear it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..core.svd import Spectrum, SpectrumRequest, basis_rows
from .files import AdapterFileError, atomic_stream_tensors, load_tensors

CACHE_VERSION = "sigmatune-basis-v2"
FIELDS = ("basis", "sigma", "indices", "sigma_max")


class BasisCache:
    """A folder of cached spectra (svd.SpectrumCache)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def read(self, keys: list[str], requests: list[SpectrumRequest]) -> list[Spectrum] | None:
        path = self._file(keys)
        if not path.exists():
            return None
        try:
            tensors, metadata = load_tensors(path)
            if json.loads(metadata.get("keys", "null")) != self._full_keys(keys):
                raise ValueError("its keys do not match")
            spectra = []
            for i, request in enumerate(requests):
                spectrum = Spectrum(**{name: tensors[f"{i}.{name}"] for name in FIELDS})
                _check(spectrum, request)
                device = request.weight.device
                spectra.append(Spectrum(**{name: getattr(spectrum, name).to(device) for name in FIELDS}))
        except (AdapterFileError, KeyError, ValueError) as err:
            warnings.warn(f"ignoring a damaged basis cache file ({err}); recomputing it", stacklevel=3)
            return None
        return spectra

    def write(self, keys: list[str], spectra: list[Spectrum]) -> None:
        tensors = {f"{i}.{name}": getattr(s, name) for i, s in enumerate(spectra) for name in FIELDS}
        try:
            metadata = {"keys": json.dumps(self._full_keys(keys))}
            atomic_stream_tensors(self._file(keys), tensors, metadata, durable=False)
        except OSError as err:
            warnings.warn(
                f"could not write the basis cache in {self.folder} ({err}); continuing without it",
                stacklevel=3,
            )

    def _full_keys(self, keys: list[str]) -> list[str]:
        return [f"{CACHE_VERSION}|{key}" for key in keys]

    def _file(self, keys: list[str]) -> Path:
        digest = hashlib.sha256("\n".join(self._full_keys(keys)).encode()).hexdigest()[:40]
        return self.folder / f"{digest}.safetensors"


def _check(spectrum: Spectrum, request: SpectrumRequest) -> None:
    d, r = basis_rows(*request.weight.shape), len(request.indices)
    if (
        spectrum.basis.shape != (d, r)
        or spectrum.sigma.shape != (r,)
        or spectrum.indices.tolist() != request.indices
    ):
        raise ValueError(f"its shapes do not match the layer {request.name!r}")
    if not (torch.isfinite(spectrum.basis).all() and torch.isfinite(spectrum.sigma).all()):
        raise ValueError("it holds NaN or Inf")
