"""Slicewise volumetric encoding: geometry, interpolation between slices, axis handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.features.dinov2 import DINOv2, ViTConfig
from dinoreg.features.slicewise import (default_slice_axis, encode_volume, encoded_indices,
                                        feature_grid_shape, patch_grid)


class MeanPatch:
    """A transparent Encoder2D: each patch feature is the mean grey value of its pixels."""

    name, patch_size, embed_dim = "mean", 14, 2

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        return grey.expand(-1, 3, -1, -1)

    def forward(self, x: torch.Tensor):
        mean = F.avg_pool2d(x[:, :1], self.patch_size)
        return torch.cat([mean, 2 * mean], 1), x[:, :2].mean((2, 3))


def tiny_vit() -> DINOv2:
    torch.manual_seed(0)
    model = DINOv2(ViTConfig(embed_dim=16, depth=1, heads=2, pos_grid=3)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_default_slice_axis_follows_superior_inferior():
    assert default_slice_axis(np.eye(4)) == 2
    permuted = np.array([[0, 0, -1.5, 0], [1.2, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1.0]])
    assert default_slice_axis(permuted) == 1
    oblique = np.eye(4)
    oblique[:3, :3] = [[0.9, 0, 0.3], [0, 1, 0], [0.2, 0, 2.0]]
    assert default_slice_axis(oblique) == 2


def test_indices_and_grids():
    assert encoded_indices(10, 3) == [0, 3, 6, 9]
    assert encoded_indices(11, 3) == [0, 3, 6, 9, 10]
    assert encoded_indices(1, 4) == [0]
    assert patch_grid(160, 192, 3.0, 14) == (34, 41)
    assert feature_grid_shape((160, 192, 224), 2, 3.0) == (34, 41, 224)
    assert feature_grid_shape((160, 192, 224), 0, 1.0) == (160, 14, 16)
    with pytest.raises(DinoregError, match="smaller than one 14x14 patch"):
        patch_grid(6, 40, 2.0, 14)
    with pytest.raises(DinoregError, match="every"):
        encoded_indices(5, 0)


def test_patch_grid_maps_cells_onto_voxels():
    """Feature y is the mean over voxels [y*H/h, (y+1)*H/h): a linear ramp reads its cell centre."""
    vol = np.broadcast_to(np.arange(56, dtype=np.float32)[:, None, None] / 56, (56, 42, 5)).copy()
    out = encode_volume(vol, MeanPatch(), axis=2, upsample=1.0, every=1)
    assert out.features.shape == (2, 4, 3, 5) and out.grid_shape == (4, 3, 5)
    centres = (np.arange(4) + 0.5) * 56 / 4 - 0.5
    assert np.allclose(out.features[0, :, 1, 2].numpy(), centres / 56, atol=1e-5)
    up = encode_volume(vol, MeanPatch(), axis=2, upsample=2.5, every=1)
    h = up.grid_shape[0]
    assert h == 10
    assert np.allclose(up.features[0, 1:-1, 1, 0].numpy(),
                       ((np.arange(1, h - 1) + 0.5) * 56 / h - 0.5) / 56, atol=1e-4)


def test_every_interpolates_linearly_and_keeps_last_slice():
    rng = np.random.default_rng(0)
    vol = rng.random((20, 28, 11), dtype=np.float32)
    model = tiny_vit()
    full = encode_volume(vol, model, axis=2, upsample=1.0, every=1, batch_size=4)
    sparse = encode_volume(vol, model, axis=2, upsample=1.0, every=4, batch_size=3)
    assert sparse.slice_indices.tolist() == [0, 4, 8, 10]
    assert sparse.cls.shape == (4, 16) and sparse.foreground.shape == (4,)
    for s in (0, 4, 8, 10):
        assert torch.allclose(sparse.features[..., s], full.features[..., s], atol=1e-5)
    expected = 0.75 * full.features[..., 4] + 0.25 * full.features[..., 8]
    assert torch.allclose(sparse.features[..., 5], expected, atol=1e-5)
    assert torch.allclose(sparse.features[..., 9], 0.5 * (full.features[..., 8] + full.features[..., 10]),
                          atol=1e-5)
    assert torch.allclose(sparse.cls[1], full.cls[4], atol=1e-5)


def test_axis_choice_equals_transposed_volume():
    rng = np.random.default_rng(1)
    vol = rng.random((9, 28, 14), dtype=np.float32)
    model = tiny_vit()
    along0 = encode_volume(vol, model, axis=0, upsample=1.0, every=2)
    along2 = encode_volume(np.ascontiguousarray(vol.transpose(1, 2, 0)), model, axis=2,
                           upsample=1.0, every=2)
    assert along0.features.shape == (16, 9, 2, 1)
    assert torch.allclose(along0.features, along2.features.permute(0, 3, 1, 2), atol=1e-5)
    assert along0.image_shape == (9, 28, 14) and along0.axis == 0


def test_errors_for_bad_input():
    with pytest.raises(DinoregError, match="smaller than one"):
        encode_volume(np.zeros((5, 5, 5), np.float32), MeanPatch(), upsample=1.0)
    with pytest.raises(DinoregError, match="3D volume"):
        encode_volume(np.zeros((5, 5), np.float32), MeanPatch())
    with pytest.raises(DinoregError, match="axis"):
        encode_volume(np.zeros((28, 28, 28), np.float32), MeanPatch(), axis=3)


def test_foreground_fraction_per_encoded_slice():
    vol = np.zeros((28, 28, 4), np.float32)
    vol[:14, :, 1] = 1.0
    out = encode_volume(vol, MeanPatch(), axis=2, upsample=1.0, every=1)
    assert out.foreground.tolist() == [0.0, 0.5, 0.0, 0.0]


def test_tri_planar_sees_the_slicing_axis_at_slice_resolution():
    """A pattern along the slicing axis that every k-th slice misses entirely (period = stride) is
    seen by the other two planes: the fused tri-planar features vary along that axis."""
    from dinoreg.features.base import EncodeRequest, SlicewiseSpec
    from dinoreg.features.slicewise_pair import common_grid, slicewise_pair
    from dinoreg.progress import Progress

    shape = (8, 8, 12)
    volume = np.zeros(shape, np.float32)
    volume[:, :, 1::4] = 1.0  # bright every 4th slice, never an encoded one (0, 4, 8)
    volume += np.linspace(0.2, 0.4, 8, dtype=np.float32)[:, None, None]
    mask = np.ones(shape, bool)

    def features(planes: str) -> torch.Tensor:
        spec = SlicewiseSpec(upsample=14.0, every=4, slice_axis=2, planes=planes, pca_components=2,
                             slice_match=False)
        req = EncodeRequest(volume, volume.copy(), mask, mask, np.eye(4), torch.device("cpu"), Progress(False), spec,
                            cell_sizes=(6, 2))
        return slicewise_pair(lambda s, d: MeanPatch(), req).fixed[0]

    single, tri = features("single"), features("tri")
    assert tuple(tri.shape[1:]) == common_grid(shape, (6, 2)) == (4, 4, 6)
    along_k = lambda f: float(f.std(dim=3).mean() / f.std().clamp_min(1e-12))  # noqa: E731
    assert along_k(single) < 1e-3
    assert along_k(tri) > 0.1


def test_token_mm_and_every_mm_set_the_slicing_from_the_voxel_size():
    from dinoreg.features.base import SlicewiseSpec
    from dinoreg.features.slicewise_pair import physical_slicing

    spec = SlicewiseSpec(upsample=3.0, every=3, token_mm=14.0, every_mm=12.0)
    two_mm = physical_slicing(spec, np.diag([2.0, 2.0, 2.0, 1.0]), 2, 14)
    one_mm = physical_slicing(spec, np.diag([1.0, 1.0, 1.0, 1.0]), 2, 14)
    assert (two_mm.upsample, two_mm.every) == (2.0, 6) and (one_mm.upsample, one_mm.every) == (1.0, 12)
    aniso = physical_slicing(spec, np.diag([0.5, 0.5, 10.0, 1.0]), 2, 14)  # thick slices: every slice encoded
    assert (aniso.upsample, aniso.every) == (0.5, 1)
    assert physical_slicing(SlicewiseSpec(upsample=3.0, every=3), np.eye(4), 2, 14) == SlicewiseSpec(upsample=3.0,
                                                                                                      every=3)
