"""Voxel-grid warping: the pull-back convention, composition and field resizing."""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.spatial.grid import (compose, field_from_numpy, field_to_numpy, identity_grid, resize_field, sample,
                                  warp)


def test_warp_is_pull_back_in_voxel_units():
    vol = torch.rand(1, 1, 8, 9, 10)
    disp = torch.zeros(1, 3, 8, 9, 10)
    disp[:, 0], disp[:, 2] = 1.0, -2.0  # out(p) = vol(p + (1, 0, -2))
    out = warp(vol, disp)
    torch.testing.assert_close(out[0, 0, :-1, :, 2:], vol[0, 0, 1:, :, :-2])


def test_warp_matches_scipy_map_coordinates():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    vol = rng.random((7, 8, 9)).astype(np.float32)
    disp = (rng.random((7, 8, 9, 3)) * 2 - 1).astype(np.float32)
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"))
    expected = map_coordinates(vol, ident + disp.transpose(3, 0, 1, 2), order=1, mode="nearest")
    got = warp(torch.from_numpy(vol)[None, None], field_from_numpy(disp))[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_compose_of_translations_adds():
    a = torch.zeros(1, 3, 6, 6, 6)
    b = torch.zeros(1, 3, 6, 6, 6)
    a[:, 0], b[:, 1] = 0.5, 1.5
    c = compose(a, b)
    assert torch.allclose(c[:, 0], torch.tensor(0.5)) and torch.allclose(c[:, 1], torch.tensor(1.5))


def test_resize_field_scales_vectors():
    disp = torch.ones(1, 3, 4, 4, 4)
    out = resize_field(disp, (8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8) and torch.allclose(out, torch.full_like(out, 2.0))


def test_numpy_layout_roundtrip_and_identity():
    arr = np.random.default_rng(2).random((3, 4, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(field_to_numpy(field_from_numpy(arr)), arr)
    grid = identity_grid((3, 4, 5))
    assert grid.shape == (1, 3, 3, 4, 5) and grid[0, 2, 0, 0, 4] == 4


def test_warp_without_gradients_equals_the_autograd_path_bit_for_bit():
    # the no-grad warp builds grid_sample's grid channel by channel; with gradients the field goes
    # through identity + disp, normalise, flip: both must give the same numbers
    torch.manual_seed(3)
    for shape, source in (((18, 20, 14), (18, 20, 14)), ((11, 9, 7), (20, 16, 12)), ((24, 22), (24, 22))):
        volume = torch.randn(2, 3, *source)
        disp = torch.randn(2, len(shape), *shape) * 4.0
        for mode, padding in (("bilinear", "border"), ("nearest", "zeros")):
            fast = warp(volume, disp, mode=mode, padding_mode=padding)
            tracked = warp(volume, disp.clone().requires_grad_(True), mode=mode, padding_mode=padding).detach()
            assert torch.equal(fast, tracked), (shape, mode)
        coords = identity_grid(shape) + disp
        assert torch.equal(sample(volume, coords), sample(volume, coords.clone().requires_grad_(True)).detach())
