"""cls-token slice matching: synthetic tokens, and a real brain shifted by 30 voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.slicewise import SliceFeatures
from dinoreg.features.slice_match import cls_offset, lowest_pairs, match_slices
from dinoreg.spatial.grid import warp

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_imgfocus" / "dinov2_vits14.safetensors"
BRAIN = SHARED / "data" / "voxelmorph_brain_t1" / "test_scan_vol.nii.gz"


def slice_tokens(positions: np.ndarray, dim: int = 32) -> torch.Tensor:
    """Smooth, distinct token per anatomical position (a random Fourier embedding)."""
    gen = torch.Generator().manual_seed(0)
    freq, phase = torch.rand(dim, generator=gen) * 0.3, torch.rand(dim, generator=gen) * 6.28
    return torch.cos(torch.as_tensor(positions, dtype=torch.float32)[:, None] * freq + phase)


def fake(indices, positions, foreground=None, axis=2) -> SliceFeatures:
    idx = torch.as_tensor(indices)
    fg = torch.ones(len(idx)) if foreground is None else torch.as_tensor(foreground, dtype=torch.float32)
    return SliceFeatures(torch.zeros(1, 1, 1, 1), slice_tokens(np.asarray(positions)), idx, fg,
                         axis, (1, 1, 1), 1)


def test_lowest_pairs():
    d = torch.tensor([[5.0, 1.0], [0.5, 9.0]])
    pairs, values = lowest_pairs(d, 10)
    assert pairs.tolist() == [[1, 0], [0, 1], [0, 0], [1, 1]] and values.tolist() == [0.5, 1, 5, 9]


def test_synthetic_offset_sign_and_blank_slices():
    fixed_idx = np.arange(0, 60, 3)
    moving_idx = np.arange(0, 60, 3)
    # moving slice b shows anatomy position b - 12 -> fixed slice a matches moving a + 12
    fixed = fake(fixed_idx, fixed_idx, axis=1)
    moving = fake(moving_idx, moving_idx - 12, axis=1)
    result = match_slices(fixed, moving)
    assert result.offset == pytest.approx(12.0) and result.translation.tolist() == [0, 12, 0]
    assert result.pairs.shape == (10, 2) and (result.pairs[:, 1] - result.pairs[:, 0] == 12).all()
    # blank slices share one token: they would win every vote if kept
    blank = np.where(moving_idx < 30, 1000.0, moving_idx - 12)
    moving_blank = fake(moving_idx, blank, foreground=(moving_idx >= 30).astype(float), axis=1)
    fixed_blank = fake(fixed_idx, np.where(fixed_idx > 45, 1000.0, fixed_idx),
                       foreground=(fixed_idx <= 45).astype(float), axis=1)
    assert match_slices(fixed_blank, moving_blank).offset == pytest.approx(12.0)
    assert match_slices(fixed_blank, moving_blank, min_foreground=0.0).offset != pytest.approx(12.0)


def test_errors():
    a = fake([0, 1], [0, 1])
    with pytest.raises(DinoregError, match="same axis"):
        match_slices(a, fake([0, 1], [0, 1], axis=0))
    with pytest.raises(DinoregError, match="non-blank"):
        match_slices(a, fake([0, 1], [0, 1], foreground=[0.0, 0.0]))
    no_cls = SliceFeatures(torch.zeros(1, 1, 1, 1), None, torch.tensor([0]), torch.ones(1), 2, (1, 1, 1), 1)
    with pytest.raises(DinoregError, match="cls"):
        match_slices(no_cls, a)
    offset, pairs, dist = cls_offset(slice_tokens(np.arange(4)), torch.arange(4),
                                     slice_tokens(np.arange(4)), torch.arange(4), n_pairs=3)
    assert offset == 0 and pairs.shape == (3, 2) and dist.shape == (3,)


@pytest.mark.skipif(not (WEIGHTS.is_file() and BRAIN.is_file()), reason="shared weights/data absent")
def test_real_brain_shift_of_30_voxels():
    from dinoreg.features.dinov2 import load_dinov2
    from dinoreg.features.slicewise import encode_volume
    from dinoreg.io.images import load_image

    vol = load_image(BRAIN).array
    model = load_dinov2("vits14", WEIGHTS)
    # every=4 does not divide 30, and a gamma change keeps slices from being identical
    shifted_up = np.zeros_like(vol)
    shifted_up[..., 30:] = vol[..., :-30] ** 0.8
    shifted_down = np.zeros_like(vol)
    shifted_down[..., :-30] = vol[..., 30:] ** 0.8
    settings = dict(axis=2, upsample=0.75, every=4, batch_size=16)
    fixed = encode_volume(vol, model, **settings)
    for moving, expected in ((shifted_up, 30.0), (shifted_down, -30.0)):
        result = match_slices(fixed, encode_volume(moving, model, **settings))
        assert abs(result.offset - expected) <= 3.0, (result.offset, result.pairs)
        assert result.translation[:2].tolist() == [0.0, 0.0]
        # pull-back: warping the moving image by t lands it back on the fixed image
        t = torch.tensor(result.translation, dtype=torch.float32).view(1, 3, 1, 1, 1)
        warped = warp(torch.from_numpy(np.ascontiguousarray(moving))[None, None],
                      t.expand(1, 3, *vol.shape))[0, 0].numpy()
        inner = slice(40, 180)
        err = np.abs(warped[..., inner] - vol[..., inner] ** 0.8).mean()
        assert err < 0.25 * np.abs(vol[..., inner] ** 0.8).mean()
