"""The known-warp benchmark's construction: the true field and its inverse undo each other, the
moving image built from them is the fixed one pulled back, and EPE scores the true field 0."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, load_script, needs_data


def _known_warp():
    return load_script("benchmarks/known_warp.py")


@pytest.fixture(scope="module")
def kw():
    return _known_warp()


@pytest.fixture(scope="module")
def blob() -> tuple[np.ndarray, np.ndarray]:
    """A smooth 40x36x32 test volume (sum of Gaussians) and an ellipsoid 'brain' mask."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (40, 36, 32)), indexing="ij"), -1)
    centre = np.array([20.0, 18.0, 16.0])
    mask = (((grid - centre) / np.array([14.0, 12.0, 11.0])) ** 2).sum(-1) < 1.0
    image = np.zeros(grid.shape[:3], np.float32)
    rng = np.random.default_rng(0)
    for _ in range(12):
        c = centre + rng.uniform(-9, 9, 3)
        image += rng.uniform(0.2, 1.0) * np.exp(-((grid - c) ** 2).sum(-1) / (2 * 3.0 ** 2))
    return image * mask, mask


def test_true_field_scale_inverse_and_epe(kw, blob) -> None:
    _, mask = blob
    spacing = (1.0, 1.5, 1.0)
    truth, inverse = kw.random_field(mask.shape, 4.0, spacing, seed=3, mask=mask, control_mm=16.0, factor=1)
    assert truth.shape == inverse.shape == (*mask.shape, 3) and truth.dtype == np.float32
    mm = np.linalg.norm(truth * np.asarray(spacing, np.float32), axis=-1)
    assert mm[mask].max() == pytest.approx(4.0, rel=0.02)  # the magnitude is in mm, inside the mask
    assert kw.jacobian_min(truth) > 0 and kw.jacobian_min(inverse) > 0
    # warping by the inverse then by the truth is the identity: u(p) + v(p + u(p)) = 0
    roundtrip = truth + np.moveaxis(np.stack([kw.warp_array(inverse[..., c], truth) for c in range(3)]), 0, -1)
    assert np.abs(roundtrip[mask]).mean() < 0.03 and np.abs(roundtrip[mask]).max() < 0.25
    # the same seed gives the same field; another seed another one
    again, _ = kw.random_field(mask.shape, 4.0, spacing, seed=3, mask=mask, control_mm=16.0, factor=1)
    np.testing.assert_array_equal(truth, again)
    other, _ = kw.random_field(mask.shape, 4.0, spacing, seed=4, mask=mask, control_mm=16.0, factor=1)
    assert np.abs(other - truth).max() > 0.5
    # EPE: 0 for the true field, the mean displacement (mm) for the identity
    assert kw.end_point_error(truth, truth, spacing, mask)["epe_mm"] == 0.0
    zero = kw.end_point_error(np.zeros_like(truth), truth, spacing, mask)
    assert zero["epe_mm"] == pytest.approx(float(mm[mask].mean()), rel=1e-5)
    assert zero["epe_max_mm"] == pytest.approx(float(mm[mask].max()), rel=1e-5)


def test_moving_image_pulled_back_by_true_field_is_fixed(kw, blob) -> None:
    image, mask = blob
    truth, inverse = kw.random_field(mask.shape, 3.0, (1.0, 1.0, 1.0), seed=5, mask=mask, control_mm=16.0)
    moving = kw.warp_array(image, inverse)
    assert np.abs(moving - image)[mask].mean() > 0.01  # the warp moves things
    # Learn2Reg convention: warped(p) = moving(p + u(p)) gives the fixed image back
    # (up to the blur of two trilinear resamplings); the opposite convention doubles the warp
    inner = mask & (np.abs(image) > 0)
    right = np.abs(kw.warp_array(moving, truth) - image)[inner].mean()
    wrong = np.abs(kw.warp_array(moving, inverse) - image)[inner].mean()
    assert right < 0.35 * np.abs(moving - image)[inner].mean() and right < 0.25 * wrong


@pytest.mark.parametrize("kind", ["gamma", "pwl", "t2"])
def test_remaps_keep_background_and_change_contrast(kw, blob, kind) -> None:
    image, mask = blob
    out = kw.remap_intensities(image, kind, seed=1)
    assert out.shape == image.shape
    assert np.all(out[image == 0] == 0)
    corr = np.corrcoef(out[mask].ravel(), image[mask].ravel())[0, 1]
    assert corr < 0.999  # a real change of contrast
    if kind == "t2":
        assert corr < 0  # inverted


@needs_data
def test_real_contrast_case_is_the_co_registered_sequence_warped(kw, tmp_path) -> None:
    """``b-t2-10``: BraTS-Reg 002's baseline T1 is fixed, the same time point's T2 warped by the
    known field is moving: pulled back by the true field it is the T2 again (up to resampling),
    and the case has no labels (Dice is NaN, EPE scores the truth 0)."""
    import nibabel as nib

    case = kw.CASES["b-t2-10"]
    data = kw.make_case(case, DATA.parent)
    assert set(data) == {"fixed", "moving", "truth", "mask", "spacing"}
    t2 = np.asarray(nib.load(str(DATA.parent / kw.BRATS.format(sequence="t2"))).dataobj, np.float32)
    mm = np.linalg.norm(data["truth"], axis=-1)[data["mask"]]
    assert mm.max() == pytest.approx(10.0, rel=0.02)
    brain = data["mask"] & (t2 > 0)
    moved = np.abs(data["moving"] - t2)[brain].mean()
    back = np.abs(kw.warp_array(data["moving"], data["truth"]) - t2)[brain].mean()
    assert back < 0.3 * moved
    path = kw.case_path(tmp_path, "b-t2-10")
    path.parent.mkdir(parents=True)
    np.savez(path, **data)
    scores = kw.score("b-t2-10", data["truth"], tmp_path)
    assert scores["epe_mm"] == 0.0 and np.isnan(scores["dice"])
