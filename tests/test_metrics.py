"""Learn2Reg metrics on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dinoreg.errors import DinoregError
from dinoreg.metrics import (aggregate, dice_per_label, evaluate_pair, folding_fraction, hd95_per_label,
                             jacobian_determinant, sdlogj, to_jsonable, tre, warp_segmentation)
from dinoreg.surface_distance import (average_surface_distance, robust_hausdorff, surface_distances,
                                      surfel_area_table_3d)


# ----------------------------------------------------------------- Dice

def test_dice_values_and_nan_cases():
    fixed = np.zeros((4, 4, 1), int)
    warped = np.zeros_like(fixed)
    fixed[0, :2] = 1          # 2 voxels
    warped[0, :1] = 1         # 1 voxel, overlap 1 -> 2*1/3
    fixed[1, :] = 2           # label 2 in fixed only -> NaN (absent in moving)
    warped[3, :] = 3          # label 3 in warped only -> NaN (absent in fixed)
    d = dice_per_label(fixed, warped)
    assert d[1] == pytest.approx(2 / 3)
    assert math.isnan(d[2]) and math.isnan(d[3])
    assert sorted(d) == [1, 2, 3]
    assert dice_per_label(fixed, warped, labels=[1]) == {1: pytest.approx(2 / 3)}


def test_dice_absence_is_judged_on_the_unwarped_moving_when_given():
    fixed = np.zeros((3, 3, 3), int)
    fixed[1, 1, 1] = 5
    warped = np.zeros_like(fixed)           # the label vanished in warping
    moving = fixed.copy()                   # but the moving image has it
    assert math.isnan(dice_per_label(fixed, warped)[5])
    assert dice_per_label(fixed, warped, moving_seg=moving)[5] == 0.0


# ----------------------------------------------------------------- surface distances / HD95

def test_surfel_areas_of_known_codes():
    table = surfel_area_table_3d((1.0, 1.0, 1.0))
    assert table[0] == table[255] == 0
    assert table[1] == pytest.approx(math.sqrt(3) / 8)      # one corner: a triangle
    assert table[15] == pytest.approx(1.0)                 # half the cube: a unit square
    assert table[60] == pytest.approx(math.sqrt(2))        # two opposite edges: two strips
    assert table[7] == pytest.approx(1.1495, abs=1e-4)     # skew pentagon, DeepMind's value
    assert np.allclose(table, table[::-1])                 # complement codes share a surface


def test_two_cubes_shifted_by_one_voxel_matches_deepmind():
    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros_like(gt)
    gt[:50] = True
    pred[:51] = True
    sd = surface_distances(gt, pred, (2, 1, 1))
    assert robust_hausdorff(sd, 95) == 2.0
    assert robust_hausdorff(sd, 100) == 2.0
    asd = average_surface_distance(sd)
    assert asd == pytest.approx((0.322, 0.339), abs=1e-3)   # surface-distance's own test values


def test_single_voxels_and_empty_masks():
    gt = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(gt)
    gt[5, 6, 7] = True
    pred[5, 6, 9] = True
    assert robust_hausdorff(surface_distances(gt, pred, (3, 2, 1)), 95) == 2.0
    assert robust_hausdorff(surface_distances(gt, np.zeros_like(gt), (1, 1, 1)), 95) == math.inf
    assert robust_hausdorff(surface_distances(np.zeros_like(gt), np.zeros_like(gt), (1, 1, 1)), 95) == math.inf


def test_hd95_per_label_voxels_mm_nan_inf_and_2d():
    fixed = np.zeros((30, 30, 30), int)
    warped = np.zeros_like(fixed)
    fixed[10:20, 10:20, 10:20] = 1
    warped[10:20, 10:20, 13:23] = 1          # shifted by 3 voxels along k
    fixed[2:5, 2:5, 2:5] = 2                 # label 2 vanished after warping -> inf
    moving = fixed.copy()
    hd_vox = hd95_per_label(fixed, warped, [1, 2, 4], moving_seg=moving)
    assert hd_vox[1] == 3.0
    assert hd_vox[2] == math.inf
    assert math.isnan(hd_vox[4])
    hd_mm = hd95_per_label(fixed, warped, [1], spacing=(1.0, 1.0, 2.5))
    assert hd_mm[1] == 7.5
    flat_f = np.zeros((20, 20, 1), int)
    flat_w = np.zeros_like(flat_f)
    flat_f[5, 5] = 1
    flat_w[5, 7] = 1
    assert hd95_per_label(flat_f, flat_w, [1], spacing=(2.0, 1.0, 1.0))[1] == 2.0


# ----------------------------------------------------------------- Jacobian, SDlogJ, folding

def _grid(shape):
    return np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"), -1)


def test_identity_field_gives_detj_one_and_zero_sdlogj():
    disp = np.zeros((9, 10, 11, 3))
    detj = jacobian_determinant(disp)
    assert detj.shape == (5, 6, 7)
    assert np.all(detj == 1.0)
    assert sdlogj(disp) == pytest.approx(0.0, abs=1e-15)
    assert folding_fraction(disp) == 0.0


def test_uniform_expansion_and_the_plus_three_quirk():
    x = _grid((12, 12, 12))
    disp = 0.1 * x                                       # x -> 1.1 x
    assert np.allclose(jacobian_determinant(disp), 1.1 ** 3)
    # a stretch varying along i: u_i = a i^2 / 2 -> detJ = 1 + a i exactly (central differences)
    a = 0.05
    disp = np.zeros((16, 8, 8, 3))
    disp[..., 0] = a * _grid((16, 8, 8))[..., 0] ** 2 / 2
    detj = jacobian_determinant(disp)
    i = np.arange(2, 14, dtype=np.float64)[:, None, None]
    assert np.allclose(detj, np.broadcast_to(1 + a * i, detj.shape))
    expected = np.log(np.broadcast_to(1 + a * i, detj.shape) + 3).std()
    assert sdlogj(disp) == pytest.approx(expected, rel=1e-12)
    assert sdlogj(disp) != pytest.approx(np.log(detj).std(), rel=1e-3)   # the +3 is really there


def test_folding_fraction_counts_detj_le_zero_before_clipping():
    disp = np.zeros((20, 8, 8, 3))
    i = np.arange(20, dtype=np.float64)
    disp[..., 0] = np.where(i <= 10, -2.0 * i, -20.0)[:, None, None]   # slope -2 up to i = 10: folded
    detj = jacobian_determinant(disp)
    assert detj.min() == -1.0
    assert folding_fraction(disp) == pytest.approx(9 / 16)            # cropped i = 2..17, folded 2..10
    mask = np.zeros((20, 8, 8))
    mask[:11] = 1
    assert folding_fraction(disp, mask) == 1.0
    assert np.isfinite(sdlogj(disp))


def test_masked_sdlogj_uses_the_cropped_mask():
    a = 0.05
    disp = np.zeros((16, 8, 8, 3))
    disp[..., 0] = a * _grid((16, 8, 8))[..., 0] ** 2 / 2
    mask = np.zeros((16, 8, 8))
    mask[6, 4, 4] = mask[9, 4, 4] = 1
    expected = np.log(np.array([1 + 6 * a, 1 + 9 * a]) + 3).std()
    assert sdlogj(disp, mask) == pytest.approx(expected)
    assert math.isnan(sdlogj(disp, np.zeros((16, 8, 8))))


def test_2d_field():
    disp = np.zeros((10, 12, 1, 3))
    disp[..., 0] = 0.5 * _grid((10, 12, 1))[..., 0]      # stretch i by 1.5
    disp[..., 2] = 7.0                                    # out-of-plane component is ignored
    detj = jacobian_determinant(disp)
    assert detj.shape == (6, 8, 1)
    assert np.allclose(detj, 1.5)
    assert sdlogj(disp) == pytest.approx(0.0, abs=1e-12)


def test_bad_fields_raise():
    with pytest.raises(DinoregError, match="shape"):
        jacobian_determinant(np.zeros((8, 8, 8)))
    with pytest.raises(DinoregError, match="too small"):
        sdlogj(np.zeros((4, 8, 8, 3)))
    with pytest.raises(DinoregError, match="mask"):
        sdlogj(np.zeros((8, 8, 8, 3)), np.ones((7, 8, 8)))


# ----------------------------------------------------------------- TRE

def test_tre_with_a_known_translation():
    disp = np.zeros((12, 12, 12, 3))
    disp[...] = (1.0, 2.0, -3.0)
    fix = np.array([[5.0, 5.0, 5.0], [6.5, 5.25, 6.0]])
    assert np.allclose(tre(fix, fix + (1, 2, -3), disp), 0.0, atol=1e-9)
    errors = tre(fix, fix, disp, spacing_moving=(2.0, 1.0, 0.5))
    assert np.allclose(errors, math.sqrt(2.0 ** 2 + 2.0 ** 2 + 1.5 ** 2))
    with pytest.raises(DinoregError):
        tre(fix, fix[:1], disp)


# ----------------------------------------------------------------- one pair, many pairs

def test_warp_segmentation_is_a_nearest_neighbour_pull_back():
    moving = np.zeros((6, 6, 6), int)
    moving[3, 3, 3] = 4
    disp = np.zeros((6, 6, 6, 3))
    disp[..., 0] = 1.2                                  # warped(p) = moving(p + 1.2 e_i) ~ moving(p + 1)
    warped = warp_segmentation(moving, disp)
    assert warped[2, 3, 3] == 4 and warped.sum() == 4


def test_evaluate_pair_and_json():
    fixed = np.zeros((16, 16, 16), int)
    fixed[4:10, 4:10, 4:10] = 1
    fixed[11:14, 11:14, 11:14] = 2
    moving = np.roll(fixed, 2, axis=0)                  # moving = fixed shifted by +2 along i
    disp = np.zeros((16, 16, 16, 3))
    disp[..., 0] = 2.0                                  # exactly undoes it
    lms = np.array([[6.0, 6.0, 6.0], [8.0, 7.0, 6.0]])
    res = evaluate_pair(disp, fixed, moving, fixed_lms=lms, moving_lms=lms + (2, 0, 0),
                        spacing=(1.0, 1.0, 2.0))
    assert res["dice"] == {"1": 1.0, "2": 1.0} and res["dice_mean"] == 1.0
    assert res["hd95_vox_mean"] == 0.0 and res["hd95_mm"]["1"] == 0.0
    assert res["tre_mm_mean"] == pytest.approx(0.0, abs=1e-9)
    assert res["sdlogj"] == pytest.approx(0.0, abs=1e-15) and res["folding_fraction"] == 0.0
    res0 = evaluate_pair(np.zeros_like(disp), fixed, moving, labels=[1, 2, 3])
    assert 0 < res0["dice"]["1"] < 1 and math.isnan(res0["dice"]["3"])
    text = json.dumps(to_jsonable(res0), allow_nan=False)
    assert '"3": null' in text
    with pytest.raises(DinoregError):
        evaluate_pair(disp, fixed, None)
    with pytest.raises(DinoregError):
        evaluate_pair(disp, fixed[:-1], moving[:-1])


def test_to_jsonable_converts_numpy_nan_and_inf():
    out = to_jsonable({1: np.float32(0.5), "a": [np.nan, np.inf, np.int64(3)], "b": np.array([1.0, 2.0]),
                       "c": np.bool_(True)})
    assert out == {"1": 0.5, "a": [None, None, 3], "b": [1.0, 2.0], "c": True}


def test_aggregate_mean_std_and_learn2reg_30th_percentile():
    pairs = [{"dice_mean": v, "dice": {"1": v}, "tre_mm": [v], "jacobian_masked": False}
             for v in (1.0, 2.0, 3.0, 4.0)]
    pairs.append({"dice_mean": float("nan"), "dice": {"1": None}})
    agg = aggregate(pairs)
    assert agg["dice_mean"]["mean"] == 2.5
    assert agg["dice_mean"]["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert agg["dice_mean"]["30"] == pytest.approx(1.9)          # pandas quantile(.3), linear
    assert agg["dice_mean"]["n"] == 4
    assert agg["dice/1"]["30"] == pytest.approx(1.9)
    assert "tre_mm" not in agg and "jacobian_masked" not in agg
