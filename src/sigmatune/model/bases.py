"""Which singular directions each layer stores and trains: the spectra a plan still needs, computed
once (rank 0 in a distributed job), read from and written to the basis cache; and the directions an
update rule cannot use.

A plan maps layer names to the singular-value indices an adapter selects there. A layer already
wrapped keeps its basis when it holds every index; otherwise it gets one SVD for the union of what it
stores and what is asked (SigmaModel.ensure_bases extends it).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.config import SigmaConfig
from ..core.layer import SpectralLinear, unwrapped
from ..core.svd import Spectrum, SpectrumRequest, shared_spectra
from ..core.weights import fingerprint, svd_source
from ..formats.basis_cache import BasisCache


def missing_spectra(
    layers: dict[str, nn.Module],
    plan: dict[str, list[int]],
    config: SigmaConfig,
    full_precision_state_dict: dict[str, torch.Tensor] | None,
) -> list[SpectrumRequest]:
    """A request for every layer of the plan whose stored directions (none, if unwrapped) miss some of
    its indices: the union of both, from the weight the SVD must see (svd_source)."""
    requests = []
    for name, indices in plan.items():
        layer = layers[name]
        stored = set(layer.stored_indices) if isinstance(layer, SpectralLinear) else set()
        if not set(indices) <= stored:
            weight = svd_source(name, unwrapped(layer), full_precision_state_dict)
            union = sorted(stored | set(indices))
            method = config.svd_method_for(union, min(weight.shape))
            requests.append(SpectrumRequest(name, weight, union, method, fingerprint(weight)))
    return requests


def compute(
    requests: list[SpectrumRequest], config: SigmaConfig, progress: bool | None
) -> dict[str, Spectrum]:
    """The requested spectra, by config's SVD settings, through the basis cache unless config.cache is off."""
    return shared_spectra(
        requests,
        oversample=config.svd_oversample,
        niter=config.svd_niter,
        cache=BasisCache(config.cache_path) if config.cache else None,
        progress=progress,
    )


def without_small_sigma(
    adapter_name: str, plan: dict, spectral: dict[str, SpectralLinear], tol: float
) -> dict:
    """Leave out directions with σ < tol · σ_max, where an additive δ would need g = δ/σ ≈ ∞ (the update
    rules that train δ: updates.UpdateRule.drops_small_sigma)."""
    kept_plan, dropped = {}, 0
    for name, indices in plan.items():
        layer = spectral[name]
        sigma = dict(zip(layer.stored_indices, layer.sigma_values.tolist(), strict=True))
        kept = [i for i in indices if sigma[i] >= tol * float(layer.sigma_max)]
        if not kept:
            raise ValueError(
                f"layer {name!r}: every selected singular value is below sigma_tol · σ_max, so an additive "
                "update cannot be applied; leave the layer out of target_modules or use update='multiplicative'"
            )
        kept_plan[name], dropped = kept, dropped + len(indices) - len(kept)
    if dropped:
        warnings.warn(
            f"adapter {adapter_name!r}: left out {dropped} singular directions with σ < sigma_tol · σ_max "
            "(an additive update there would divide by ~0); use update='multiplicative' to keep them",
            stacklevel=4,
        )
    return kept_plan
