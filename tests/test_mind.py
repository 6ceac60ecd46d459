"""MIND-SSC properties on real anatomy."""

from __future__ import annotations

import torch

from dinoreg.features.mind import mind_ssc, ssc_pairs


def test_twelve_pairs_at_sqrt2():
    pairs = ssc_pairs()
    assert len(pairs) == 12
    for a, b in pairs:
        assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2


def test_shape_range_and_intensity_invariance(brain_crop):
    img = torch.from_numpy(brain_crop)[None, None]
    m = mind_ssc(img, 1, 2)
    assert m.shape == (1, 12, *brain_crop.shape)
    assert float(m.min()) > 0 and float(m.max()) <= 1.0 + 1e-6
    m2 = mind_ssc(img * 3.7 + 11.0, 1, 2)  # affine intensity change (another scanner scale)
    torch.testing.assert_close(m, m2, atol=2e-4, rtol=0)


def test_translation_equivariance(brain_crop):
    img = torch.from_numpy(brain_crop)[None, None]
    shifted = torch.roll(img, shifts=5, dims=2)
    a, b = mind_ssc(img), mind_ssc(shifted)
    # away from borders and the wrap-around, the descriptor shifts with the image; the
    # per-volume variance normaliser changes only slightly with the rolled-in rows
    inner = (slice(None), slice(None), slice(12, 80), slice(8, -8), slice(8, -8))
    diff = (torch.roll(a, 5, 2)[inner] - b[inner]).abs().mean()
    assert float(diff) < 0.01
