"""Edge alignment (dinoreg.optim.edges): squared NGF of a fixed image and a warped moving one on a
real brain crop."""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.optim.edges import EdgeAlignment


def _samples(mask: np.ndarray, count: int = 40000) -> np.ndarray:
    flat = np.flatnonzero(mask)
    return np.sort(np.random.default_rng(0).choice(flat, min(count, flat.size), replace=False))


def test_the_true_shift_aligns_edges_better_than_none_whatever_the_contrast(brain_crop):
    """The crop against itself shifted by 2 voxels along the first axis: the true pull-back field
    (+2) scores well above the zero field (0.91 against 0.51; below 1 where eps damps weak
    gradients), and inverting the moving contrast (edges change
    sign, not place) changes no score."""
    fixed = (brain_crop / brain_crop.max()).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    zero = torch.zeros(1, 3, *fixed.shape)
    truth = zero.clone()
    truth[:, 0] = 2.0
    flat = _samples(fixed > 0.05)
    scores = []
    for image in (moving, 1.0 - moving):
        edges = EdgeAlignment(fixed, image, flat, zero)
        scores.append((edges.reference_score, edges.score(truth)))
    assert scores[0][1] > 0.85 and scores[0][1] > scores[0][0] + 0.2, scores
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5)


def test_a_two_dimensional_pair_has_no_gradient_across_its_flat_axis(brain_crop):
    """One slice ``(I, J, 1)``: the score is defined (no reads across the missing axis) and the
    true in-plane shift still wins."""
    fixed = (brain_crop[:, :, 48:49] / brain_crop.max()).astype(np.float32)
    moving = np.roll(fixed, -3, axis=1)
    zero = torch.zeros(1, 3, *fixed.shape)
    truth = zero.clone()
    truth[:, 1] = -3.0
    edges = EdgeAlignment(fixed, moving, _samples(fixed > 0.05), zero)
    assert 0.0 <= edges.reference_score < edges.score(truth) <= 1.0


def test_a_constant_moving_image_scores_zero_without_nan(brain_crop):
    """No edges in the moving image: every score is 0 (no NaN from a zero eps), so no candidate
    field can look better than another."""
    fixed = (brain_crop / brain_crop.max()).astype(np.float32)
    zero = torch.zeros(1, 3, *fixed.shape)
    edges = EdgeAlignment(fixed, np.full_like(fixed, 0.5), _samples(fixed > 0.05), zero)
    assert edges.reference_score == 0.0 and edges.score(zero + 1.0) == 0.0


def test_the_fused_kernel_scores_as_the_torch_path(brain_crop):
    """The numba kernel (central differences of the warped image at the samples in one pass) and
    the torch path (grid_sample at every neighbour) give the same gradients and scores, on a 3D
    crop under a smooth random field and on one slice."""
    from dinoreg import jit

    if not jit.available():
        return
    rng = np.random.default_rng(4)
    for image in (brain_crop, brain_crop[:, :, 40:41]):
        fixed = (image / image.max()).astype(np.float32)
        moving = np.roll(fixed, 1, axis=1) ** 1.5
        field = torch.from_numpy(rng.normal(0.0, 1.5, (1, 3, *fixed.shape)).astype(np.float32))
        if fixed.shape[2] == 1:
            field[:, 2] = 0.0
        flat = _samples(fixed > 0.05)
        fused = EdgeAlignment(fixed, moving, flat, torch.zeros_like(field))
        reference = EdgeAlignment(fixed, moving, flat, torch.zeros_like(field))
        reference.fused = False
        assert fused.fused
        np.testing.assert_allclose(fused._warped_gradients(field), reference._warped_gradients(field), atol=1e-5)
        assert abs(fused.score(field) - reference.score(field)) < 1e-6


def test_an_increment_on_cells_scores_as_its_upsampled_field(brain_crop):
    """The MI level's trial check reads its increment at the samples' neighbours: the same score
    as the increment upsampled to the image grid and added to the field (both paths)."""
    from dinoreg.optim.convex_adam import field_from_cells, padded_shape

    rng = np.random.default_rng(5)
    fixed = (brain_crop / brain_crop.max()).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    so_far = torch.from_numpy(rng.normal(0.0, 0.5, (1, 3, *fixed.shape)).astype(np.float32))
    coarse = tuple(p // 3 for p in padded_shape(fixed.shape, 3))
    increment = rng.normal(0.0, 0.6, (3, *coarse)).astype(np.float32)
    whole = so_far + field_from_cells(torch.from_numpy(increment)[None], fixed.shape, 3)
    edges = EdgeAlignment(fixed, moving, _samples(fixed > 0.05), torch.zeros_like(so_far))
    for fused in (edges.fused, False):
        edges.fused = fused
        assert abs(edges.score(so_far, increment, (3, 3, 3)) - edges.score(whole)) < 1e-5
