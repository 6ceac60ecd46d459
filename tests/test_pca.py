"""Joint foreground-masked low-rank PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.pca import fit_pca, foreground_mask, joint_pca


def low_rank_volume(seed: int, basis: torch.Tensor, grid=(6, 7, 8), noise=1e-3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coeff = torch.randn(basis.shape[0], *grid, generator=gen) * torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1, 1)
    feats = torch.einsum("rc,rijk->cijk", basis, coeff) + 2.0
    return feats + noise * torch.randn(feats.shape, generator=gen)


def test_recovers_subspace_and_matches_exact_pca():
    basis = torch.linalg.qr(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)))[0].T
    fixed, moving = low_rank_volume(1, basis), low_rank_volume(2, basis)
    fr, mr, fitted = joint_pca(fixed, moving, k=3)
    assert fr.shape == (3, 6, 7, 8) and mr.shape == (3, 6, 7, 8)
    tokens = torch.cat([fixed.reshape(40, -1).T, moving.reshape(40, -1).T])
    exact = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)[2][:3]
    overlap = (fitted.components @ exact.T).abs()
    assert torch.allclose(overlap, torch.eye(3), atol=1e-3)
    assert torch.allclose(fitted.components @ fitted.components.T, torch.eye(3), atol=1e-5)
    # reduced channels are centred, unwhitened projections ordered by variance
    var = torch.cat([fr.reshape(3, -1), mr.reshape(3, -1)], 1).var(1)
    assert torch.allclose(var, fitted.explained_variance, rtol=1e-3)
    assert var[0] > var[1] > var[2]


def test_deterministic_and_sign_convention():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 5, 5, 5, generator=gen), torch.randn(16, 5, 5, 5, generator=gen)
    r1 = joint_pca(a, b, k=4)
    r2 = joint_pca(a, b, k=4)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[2].components, r2[2].components)
    comps = r1[2].components
    top = comps.gather(1, comps.abs().argmax(1, keepdim=True))
    assert (top > 0).all()
    torch.manual_seed(7)
    before = torch.randn(3)
    torch.manual_seed(7)
    joint_pca(a, b, k=4)
    assert torch.equal(torch.randn(3), before)  # global RNG untouched


def test_mask_restricts_the_fit():
    gen = torch.Generator().manual_seed(4)
    feats = 0.01 * torch.randn(8, 4, 4, 4, generator=gen)
    feats[0, :2] += 100.0 * torch.randn(2, 4, 4, generator=gen)  # huge variance in background
    feats[1, 2:] += torch.randn(2, 4, 4, generator=gen)  # foreground varies along channel 1
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[2:] = True
    _, _, unmasked = joint_pca(feats, feats, k=1)
    _, _, masked = joint_pca(feats, feats, k=1, fixed_mask=mask, moving_mask=mask)
    assert unmasked.components[0].abs().argmax() == 0
    assert masked.components[0].abs().argmax() == 1


def test_foreground_mask_from_intensity():
    vol = np.zeros((20, 20, 20), np.float32)
    vol[:10] = 0.5
    mask = foreground_mask(vol, (4, 5, 20))
    assert mask.shape == (4, 5, 20) and mask.dtype == torch.bool
    assert mask[:2].all() and not mask[2:].any()


def test_errors():
    a = torch.randn(8, 3, 3, 3)
    empty = torch.zeros(3, 3, 3, dtype=torch.bool)
    with pytest.raises(DinoregError, match="mask is empty"):
        joint_pca(a, a, k=2, fixed_mask=empty, moving_mask=empty)
    with pytest.raises(DinoregError, match="does not match"):
        joint_pca(a, a, k=2, fixed_mask=torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(DinoregError, match="channels"):
        joint_pca(a, torch.randn(4, 3, 3, 3), k=2)
    with pytest.raises(DinoregError, match="principal components"):
        fit_pca(torch.randn(5, 8), k=6)


def test_token_subsample_is_seeded():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(12, 10, 10, 10, generator=gen), torch.randn(12, 10, 10, 10, generator=gen)
    r1 = joint_pca(a, b, k=3, max_tokens=500)
    r2 = joint_pca(a, b, k=3, max_tokens=500)
    assert torch.equal(r1[2].components, r2[2].components)
