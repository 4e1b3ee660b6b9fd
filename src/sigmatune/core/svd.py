"""Singular directions of layer weights: exact (every direction of the stored side, by an fp64
eigendecomposition of its Gram matrix) or randomized SVD (the top ones), batched over layers of one shape,
with canonical signs, read from and written to a cache the caller passes (formats/basis_cache.py).

One rule makes two wrappings of the same weights "the same base", however their bases were found: every
spectrum handed out is the exact SVD's within BASIS_TOLERANCE (spectrum_error). A randomized result that
misses it (on flat spectra, as LLM weights have, subspace iteration converges slowly) is replaced by the
exact one, and a spectrum read from the cache that misses it is recomputed. So an adapter's vectors sit on
the directions they were trained on wherever it is loaded, and its saved σ match any other wrapping's.

A layer keeps one side only (docs/ARCHITECTURE.md): the input side V_S (in × r) when in ≤ out, else
the output side U_S (out × r). Both identities below make that enough:

    W V_S = U_S diag(σ_S)        U_Sᵀ W = diag(σ_S) V_Sᵀ
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from .progress import Progress

logger = logging.getLogger(__name__)
BATCH_ELEMENTS = 1 << 28  # weight elements per batched SVD call (1 GiB in fp32)
RANDOM_SEED = 0  # the randomized SVD's test matrix depends only on its shape and this seed
BASIS_TOLERANCE = 1e-4  # spectrum_error of every spectrum handed out: ‖WᵀW v − σ² v‖ ≤ this · σ_ref²
POWER_STEPS = 8  # power iterations for a lower bound of σ_1 where a spectrum does not hold it


@dataclass
class Spectrum:
    """The selected singular directions of one layer, on one side."""

    basis: torch.Tensor  # (d, r) orthonormal: V_S (input side, d = in) or U_S (output side, d = out)
    sigma: torch.Tensor  # (r,) σ_S
    indices: torch.Tensor  # (r,) int64, positions in the descending spectrum (0 = largest)
    sigma_max: torch.Tensor  # () σ_1


@dataclass
class SpectrumRequest:
    """What to compute for one layer."""

    name: str
    weight: torch.Tensor  # (out, in), any float dtype, on the device the SVD runs on
    indices: list[int]  # sorted singular-value indices to keep
    method: str  # "exact" or "randomized"
    fingerprint: str  # weights.fingerprint(weight): the cache key's identity of the weight


class SpectrumCache(Protocol):
    """Where computed spectra are kept between runs (formats.basis_cache.BasisCache on disk): the spectra of
    one call of compute_spectra are kept together, under the list of their keys."""

    def read(self, keys: list[str], requests: list[SpectrumRequest]) -> list[Spectrum] | None:
        """The spectra stored under these keys, checked against the requests, on their devices; or None."""

    def write(self, keys: list[str], spectra: list[Spectrum]) -> None:
        """Keep the spectra under these keys (a failure to keep them must not fail the computation)."""


def side_for(out_features: int, in_features: int) -> str:
    """The side whose basis is smaller: 'input' when in ≤ out, else 'output'."""
    return "input" if in_features <= out_features else "output"


def basis_rows(out_features: int, in_features: int) -> int:
    """d, the rows of the stored basis: in (the input side's V_S) when in ≤ out, else out (U_S)."""
    return in_features if side_for(out_features, in_features) == "input" else out_features


def compute_spectra(
    requests: list[SpectrumRequest],
    oversample: int = 16,
    niter: int = 4,
    cache: SpectrumCache | None = None,
    progress: bool | None = None,
) -> dict[str, Spectrum]:
    """Spectra for every request: from the cache when these requests were computed before (one entry for
    all of them), else by batched SVD, then cached together."""
    if not requests:
        return {}
    keys = [spectrum_key(request, oversample, niter) for request in requests]
    cached = None if cache is None else cache.read(keys, requests)
    if cached is not None and _all_accurate(requests, cached):
        logger.info("bases: %d from cache, 0 to compute", len(requests))
        return {request.name: spectrum for request, spectrum in zip(requests, cached, strict=True)}
    if cached is not None:
        warnings.warn(
            "a basis cache file holds directions that are not these weights' singular vectors (edited, or "
            "written by another version); recomputing it",
            stacklevel=2,
        )
    logger.info("bases: 0 from cache, %d to compute", len(requests))
    groups = defaultdict(list)
    for request in requests:
        groups[_group_key(request, oversample)].append(request)
    found = {}
    bar = Progress(len(requests), "SVD", "layer", show=progress)
    for (shape, _, _, method, q), members in groups.items():
        per_batch = max(1, BATCH_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, len(members), per_batch):
            batch = members[start : start + per_batch]
            found.update(zip((r.name for r in batch), _batched_spectra(batch, method, q, niter), strict=True))
            bar.update(len(batch))
    bar.close()
    if cache is not None:
        cache.write(keys, [found[request.name] for request in requests])
    return found


def shared_spectra(requests: list[SpectrumRequest], **options) -> dict[str, Spectrum]:
    """compute_spectra(requests, **options), once: in a torch.distributed job rank 0 computes and
    broadcasts, so that every rank holds bit-identical bases (each rank's own SVD could differ in the
    last bits, or in signs)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute_spectra(requests, **options)
    if dist.get_rank() == 0:
        spectra = compute_spectra(requests, **options)
    else:
        spectra = {request.name: _empty_spectrum(request) for request in requests}
    for request in requests:  # the same order on every rank
        spectrum = spectra[request.name]
        for tensor in (spectrum.basis, spectrum.sigma, spectrum.indices, spectrum.sigma_max):
            dist.broadcast(tensor, src=0)
    return spectra


def _empty_spectrum(request: SpectrumRequest) -> Spectrum:
    d = basis_rows(*request.weight.shape)
    r, device, dtype = len(request.indices), request.weight.device, _compute_dtype(request.weight)
    return Spectrum(
        basis=torch.empty(d, r, device=device, dtype=dtype),
        sigma=torch.empty(r, device=device, dtype=dtype),
        indices=torch.empty(r, device=device, dtype=torch.int64),
        sigma_max=torch.empty((), device=device, dtype=dtype),
    )


def exact_side(weight: torch.Tensor, input_side: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every singular direction of one side of a (B, m, n) batch, from the Gram matrix of that side:
    (basis (B, d, k), σ (B, k) descending), d = n and the right vectors V when input_side, else d = m and U.

        input side:  Wᵀ W = V diag(σ²) Vᵀ       output side:  W Wᵀ = U diag(σ²) Uᵀ

    The Gram matrix and its eigendecomposition are in fp64 (squaring σ loses the small ones' digits in
    fp32; on a GPU fp64 eigh of the Gram matrix costs what fp32's does, far less than an SVD of the layer).
    A member whose eigenvectors fail the check (residual ‖G V − V Λ‖ / ‖G‖ or ‖VᵀV − I‖ above 1e-9)
    takes the SVD instead. So does an fp64 batch (a reference): through Gram, σ is exact to ~1e-8 σ₁, finer
    than fp32 can hold but not fp64."""
    if weight.dtype == torch.float64:
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        return (vh.mT if input_side else u), sigma
    wide = weight.double()
    gram = wide.mT @ wide if input_side else wide @ wide.mT  # (B, d, d)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(-1), vectors.flip(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    residual = torch.linalg.matrix_norm(gram @ vectors - vectors * values[:, None, :])
    residual = residual / torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(gram.dtype).tiny)
    orthogonality = (vectors.mT @ vectors - eye).abs().amax(dim=(-2, -1))
    sigma = values.clamp_min(0).sqrt()
    for b in torch.nonzero((residual > 1e-9) | (orthogonality > 1e-9)).flatten().tolist():
        logger.warning("eigh of layer %d of a batch failed its check: exact SVD instead", b)
        u, sigma[b], vh = torch.linalg.svd(wide[b], full_matrices=False)
        vectors[b] = vh.mT if input_side else u
    return vectors.to(weight.dtype), sigma.to(weight.dtype)


def randomized_svd(
    weight: torch.Tensor, q: int, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top q singular triplets of a (…, m, n) batch by subspace iteration (Halko et al. 2011).

    Y = W Ω, then niter rounds of Q ← orth(W orth(Wᵀ Q)); finally the SVD of the small Qᵀ W.
    Ω (n × q) is drawn on the CPU from a fixed seed, so every device starts from the same matrix.
    """
    n = weight.shape[-1]
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    omega = torch.randn(n, q, generator=generator, dtype=torch.float64).to(weight)  # (n, q)
    basis = torch.linalg.qr(weight @ omega).Q  # (…, m, q)
    for _ in range(niter):
        row_basis = torch.linalg.qr(weight.mT @ basis).Q  # (…, n, q)
        basis = torch.linalg.qr(weight @ row_basis).Q  # (…, m, q)
    small_u, sigma, vh = torch.linalg.svd(
        basis.mT @ weight, full_matrices=False
    )  # (…, q, q), (…, q), (…, q, n)
    return basis @ small_u, sigma, vh


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (SVD signs are arbitrary)."""
    rows = basis.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(basis[rows, torch.arange(basis.shape[1], device=basis.device)])
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


# ---- batching ---------------------------------------------------------------------------------------


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _group_key(request: SpectrumRequest, oversample: int) -> tuple:
    out_features, in_features = request.weight.shape
    q = min(max(request.indices) + 1 + oversample, min(out_features, in_features))
    if request.method == "exact":
        q = 0
    return (
        tuple(request.weight.shape),
        request.weight.device,
        _compute_dtype(request.weight),
        request.method,
        q,
    )


def _batched_spectra(requests: list[SpectrumRequest], method: str, q: int, niter: int) -> list[Spectrum]:
    weights = torch.stack([r.weight.detach().to(_compute_dtype(r.weight)) for r in requests])  # (B, m, n)
    out_features, in_features = weights.shape[1:]
    input_side = side_for(out_features, in_features) == "input"
    if method == "exact":
        bases, sigma = exact_side(weights, input_side)  # (B, d, k), (B, k)
        return [_selected(request, bases[b], sigma[b]) for b, request in enumerate(requests)]
    u, sigma, vh = randomized_svd(weights, q, niter)
    bases = vh.mT if input_side else u
    spectra = [_selected(request, bases[b], sigma[b]) for b, request in enumerate(requests)]
    missed = [
        b for b, spectrum in enumerate(spectra) if spectrum_error(weights[b], spectrum) > BASIS_TOLERANCE
    ]
    if missed:  # not converged in niter iterations: those layers take the exact decomposition
        logger.info(
            "randomized SVD missed the tolerance on %d of %d layers: exact", len(missed), len(spectra)
        )
        exact = _batched_spectra([requests[b] for b in missed], "exact", 0, 0)
        for b, spectrum in zip(missed, exact, strict=True):
            spectra[b] = spectrum
    return spectra


def _selected(request: SpectrumRequest, basis: torch.Tensor, sigma: torch.Tensor) -> Spectrum:
    """The request's directions of one member's decomposition: basis (d, q), σ (q,) descending."""
    index = torch.tensor(request.indices, dtype=torch.int64, device=basis.device)
    return Spectrum(
        basis=canonical_signs(basis[:, index]).contiguous(),  # (d, r)
        sigma=sigma[index].contiguous(),
        indices=index,
        sigma_max=sigma[0].clone(),
    )


# ---- checking a spectrum against its weight ---------------------------------------------------------


def spectrum_error(weight: torch.Tensor, spectrum: Spectrum) -> float:
    """How far a spectrum is from the exact SVD of weight (out, in), relative to σ_ref², σ_ref = the larger
    of its σ and a power-iteration lower bound of σ_1 (never the σ_max it claims):

        max_i ‖Gᵀ G b_i − σ_i² b_i‖,  G = W (input side, b_i = v_i) or Wᵀ (output side, b_i = u_i)

    and the basis's departure from orthonormality, and |σ_max − σ_1| where index 0 is selected (elsewhere
    σ_max must lie between the lower bound and ‖W‖_F). Two GEMMs of (out × in × r): a fraction of any SVD.
    A spectrum of the wrong shape, or with NaN, is infinitely far."""
    wide = weight.detach().to(
        spectrum.basis.dtype if spectrum.basis.dtype == torch.float64 else torch.float32
    )
    side = wide if side_for(*weight.shape) == "input" else wide.mT  # (·, d)
    basis = spectrum.basis.to(wide)  # (d, r)
    sigma, sigma_max = spectrum.sigma.to(wide), spectrum.sigma_max.to(wide)
    if basis.shape != (side.shape[1], len(sigma)) or not bool(
        torch.isfinite(basis).all() & torch.isfinite(sigma).all()
    ):
        return float("inf")
    floor = _largest_sigma_below(side)
    reference = torch.maximum(sigma.max(), floor).clamp_min(torch.finfo(wide.dtype).tiny)
    residual = side.mT @ (side @ basis) - basis * sigma.square()  # (d, r)
    errors = [
        float(residual.norm(dim=0).max() / reference.square()),
        float((basis.mT @ basis - torch.eye(len(sigma), dtype=wide.dtype, device=wide.device)).abs().max()),
    ]
    if int(spectrum.indices[0]) == 0:
        errors.append(float((sigma_max - sigma[0]).abs() / reference))
    elif not floor * (1 - BASIS_TOLERANCE) <= sigma_max <= torch.linalg.matrix_norm(side):
        errors.append(float("inf"))
    return max(errors)


def _largest_sigma_below(side: torch.Tensor) -> torch.Tensor:
    """A lower bound of σ_1 by POWER_STEPS power iterations from a fixed start: ‖G x‖ for a unit x."""
    x = torch.randn(side.shape[1], generator=torch.Generator().manual_seed(RANDOM_SEED), dtype=torch.float64)
    x = x.to(side)
    for _ in range(POWER_STEPS):
        x = side.mT @ (side @ x)
        x = x / x.norm().clamp_min(torch.finfo(side.dtype).tiny)
    return (side @ x).norm()


def _all_accurate(requests: list[SpectrumRequest], spectra: list[Spectrum]) -> bool:
    return all(
        spectrum_error(request.weight, spectrum) <= BASIS_TOLERANCE
        for request, spectrum in zip(requests, spectra, strict=True)
    )


# ---- cache keys -------------------------------------------------------------------------------------


def spectrum_key(request: SpectrumRequest, oversample: int, niter: int) -> str:
    """What identifies a computed spectrum: the weight's fingerprint, the side, the method, the dtype and
    the selected indices (the cache stores one spectrum per key)."""
    method = request.method if request.method == "exact" else f"randomized-p{oversample}-n{niter}"
    indices = hashlib.sha256(",".join(map(str, request.indices)).encode()).hexdigest()[:16]
    side = side_for(*request.weight.shape)
    dtype = str(_compute_dtype(request.weight)).removeprefix("torch.")
    return f"{request.fingerprint}|{side}|{method}|{dtype}|idx-{indices}"
