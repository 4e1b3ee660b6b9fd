"""SVD bases: exact vs randomized, batching, canonical signs, fingerprints (the on-disk cache:
tests/formats/test_basis_cache.py)."""

from __future__ import annotations

import pytest
import torch

from sigmatune.core import svd
from sigmatune.core.svd import SpectrumRequest, canonical_signs, compute_spectra, randomized_svd
from sigmatune.core.weights import fingerprint


def decaying(out_features=96, in_features=64, seed=0, dtype=torch.float32) -> torch.Tensor:
    """A random matrix with singular values 1, 0.9, 0.81, … (a clear gap for randomized SVD)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_features, out_features, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_features, in_features, generator=g, dtype=torch.float64)).Q
    k = min(out_features, in_features)
    sigma = 0.9 ** torch.arange(k, dtype=torch.float64)
    return ((u[:, :k] * sigma) @ v[:, :k].T).to(dtype)


def request(weight, indices, method="exact", name="w"):
    return SpectrumRequest(name, weight, indices, method, fingerprint(weight))


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_randomized_matches_exact_on_top_directions(shape):
    weight = decaying(*shape)
    exact = compute_spectra([request(weight, list(range(8)))], progress=False)["w"]
    fast = compute_spectra(
        [request(weight, list(range(8)), "randomized")], oversample=8, niter=4, progress=False
    )["w"]
    torch.testing.assert_close(fast.sigma, exact.sigma, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        fast.basis, exact.basis, rtol=1e-3, atol=1e-3
    )  # canonical signs make them equal
    assert fast.basis.shape == (min(shape), 8)
    torch.testing.assert_close(fast.basis.T @ fast.basis, torch.eye(8), rtol=0, atol=1e-5)


def test_basis_is_the_smaller_side_and_satisfies_the_identities():
    weight = decaying(96, 64, dtype=torch.float64)
    tall = compute_spectra([request(weight, [0, 3, 7])], progress=False)["w"]  # in = 64 ≤ out: V_S
    _u, sigma, _vh = torch.linalg.svd(weight, full_matrices=False)
    index = torch.tensor([0, 3, 7])
    torch.testing.assert_close(tall.sigma, sigma[index])
    # W V_S = U_S diag(σ_S): the columns of W V_S have norms σ_S and are orthogonal
    image = weight @ tall.basis
    torch.testing.assert_close(image.T @ image, torch.diag(sigma[index] ** 2), rtol=1e-10, atol=1e-12)
    wide = compute_spectra([request(weight.T.contiguous(), [0, 3, 7])], progress=False)["w"]  # out = 64 < in
    torch.testing.assert_close(wide.basis, tall.basis, rtol=1e-10, atol=1e-12)  # U of Wᵀ is V of W


def test_batched_equals_one_at_a_time():
    weights = [decaying(seed=s) for s in range(3)]
    together = compute_spectra(
        [request(w, [0, 1, 2], name=str(i)) for i, w in enumerate(weights)], progress=False
    )
    for i, w in enumerate(weights):
        alone = compute_spectra([request(w, [0, 1, 2])], progress=False)["w"]
        torch.testing.assert_close(together[str(i)].basis, alone.basis, rtol=1e-5, atol=1e-6)


def test_canonical_signs_remove_the_sign_ambiguity():
    basis = torch.linalg.qr(torch.randn(10, 4)).Q
    flipped = basis * torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(canonical_signs(basis), canonical_signs(flipped))
    columns = canonical_signs(basis)
    assert (columns[columns.abs().argmax(0), torch.arange(4)] > 0).all()


def test_randomized_svd_is_reproducible():
    weight = decaying()
    first = randomized_svd(weight, 12, 2)
    second = randomized_svd(weight.clone(), 12, 2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_fingerprint_tracks_content_not_layout():
    weight = torch.randn(40, 30)
    assert fingerprint(weight) == fingerprint(weight.clone())
    assert fingerprint(weight) == fingerprint(weight.T.contiguous().T)  # same values, other strides
    changed = weight.clone()
    changed[17, 3] = torch.nextafter(changed[17, 3], torch.tensor(1e9))
    assert fingerprint(changed) != fingerprint(weight)
    swapped = weight.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprint(swapped) != fingerprint(weight)
    assert fingerprint(weight.double()) != fingerprint(weight)


def spectra_of_steep_matrices(shape, dtype):
    """Two layers, singular values from 1 down to 1e-6 (one exactly 0), against torch's fp64 SVD."""
    weights = []
    for seed in (3, 4):
        weight = decaying(*shape, seed=seed).double()
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        sigma = torch.logspace(0, -6, len(sigma), dtype=torch.float64)
        sigma[-1] = 0
        weights.append((u * sigma) @ vh)
    return torch.stack(weights).to(dtype)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])  # input side, output side
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_side_matches_the_svd_down_to_tiny_singular_values(shape, dtype):
    weights = spectra_of_steep_matrices(shape, dtype)
    input_side = shape[1] <= shape[0]
    bases, sigma = svd.exact_side(weights, input_side)
    assert bases.dtype == sigma.dtype == dtype and bases.shape == (2, min(shape), min(shape))
    for b in range(2):
        u, expected, vh = torch.linalg.svd(weights[b].double(), full_matrices=False)
        reference = vh.T if input_side else u
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(sigma[b].double(), expected, rtol=tol, atol=tol)
        eye = torch.eye(min(shape), dtype=torch.float64)
        torch.testing.assert_close(bases[b].double().T @ bases[b].double(), eye, rtol=0, atol=10 * tol)
        # distinct σ: each direction is the SVD's up to its sign (the last, σ = 0, is fixed by the others)
        overlap = (bases[b].double().T @ reference).diagonal().abs()
        torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-4)
        # the identities the one-sided form rests on
        side = (
            weights[b].double() @ bases[b].double()
            if input_side
            else weights[b].double().T @ bases[b].double()
        )
        torch.testing.assert_close(side.norm(dim=0), sigma[b].double(), rtol=1e-4, atol=10 * tol)


def test_a_layer_whose_eigenvectors_fail_the_check_takes_the_svd(monkeypatch, caplog):
    weights = spectra_of_steep_matrices((96, 64), torch.float32)
    eigh = torch.linalg.eigh

    def broken(gram):  # the second layer's eigenvectors no longer orthonormal
        values, vectors = eigh(gram)
        vectors[1, :, 0] *= 1.5
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    bases, sigma = svd.exact_side(weights, True)
    assert "failed its check" in caplog.text
    _, expected, vh = torch.linalg.svd(weights[1].double(), full_matrices=False)
    torch.testing.assert_close(sigma[1].double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bases[1].abs().double(), vh.T.abs(), rtol=1e-4, atol=1e-4)
