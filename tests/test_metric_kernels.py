"""The fast metric kernels give exactly what the straightforward versions give.

``make demo`` spends most of its time outside registration in the metrics and in writing the
field; these kernels (block-wise, bincount, bit-shift codes, numba NDV and distance-transform passes, ISA-L gzip) must
not change a single value or byte of what is written. Each is compared with the reference it
replaced, bit for bit, on random inputs built to hit the edge cases and on real label maps.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dinoreg import metrics, ndv, surface_distance
from dinoreg.edt import distance_to
from dinoreg.io.images import save_image
from dinoreg.jit import available as jit_available

from conftest import BRAIN_FIXED_SEG, needs_data



def _map_coordinates_reference(seg: np.ndarray, disp: np.ndarray) -> np.ndarray:
    identity = np.meshgrid(*(np.arange(s) for s in disp.shape[:3]), indexing="ij")
    coords = np.stack(identity) + np.moveaxis(np.asarray(disp, dtype=np.float64), -1, 0)
    return ndimage.map_coordinates(seg, coords, order=0)


def _jacobian_reference(disp: np.ndarray) -> np.ndarray:
    disp = np.asarray(disp, dtype=np.float64)
    jac = np.empty((3, 3) + tuple(s - 4 for s in disp.shape[:3]))
    for a in range(3):
        for c in range(3):
            jac[a, c] = metrics._gradient(disp[..., c], a)[2:-2, 2:-2, 2:-2] + (1.0 if a == c else 0.0)
    return (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
            - jac[1, 0] * (jac[0, 1] * jac[2, 2] - jac[0, 2] * jac[2, 1])
            + jac[2, 0] * (jac[0, 1] * jac[1, 2] - jac[0, 2] * jac[1, 1]))


def _random_labels(shape: tuple[int, ...], seed: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return np.digitize(smooth, np.quantile(smooth, np.linspace(0, 1, n + 1)[1:-1])).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_warp_segmentation_is_map_coordinates_order_0(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (13, 17, 11)
    seg = rng.integers(0, 9, shape).astype(np.int16)
    disp = (rng.standard_normal(shape + (3,)) * 4).astype(np.float32)
    disp[::3, ::2, :, 0] = np.round(disp[::3, ::2, :, 0]) + 0.5  # exact halves: the rounding rule
    disp[0, :, :, 1] = -np.arange(shape[1])[:, None]  # lands exactly on the lower edge
    disp[-1, :, :, 2] = (shape[2] - 1) - np.arange(shape[2])[None, :]  # exactly on the upper edge
    out = metrics.warp_segmentation(seg, disp)
    assert out.dtype == seg.dtype
    np.testing.assert_array_equal(out, _map_coordinates_reference(seg, disp))


def test_jacobian_blocks_equal_the_correlation_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    disp = (ndimage.gaussian_filter(rng.standard_normal((23, 19, 21, 3)), (1.5, 1.5, 1.5, 0)) * 20).astype(np.float32)
    got = metrics.jacobian_determinant(disp)
    assert got.shape == (19, 15, 17)
    np.testing.assert_array_equal(got, _jacobian_reference(disp))
    assert (got <= 0).any() and (got > 0).any()  # the case has folds and regular voxels


def test_ndv_kernel_equals_numpy_bit_for_bit() -> None:
    if not jit_available():
        pytest.skip("numba not installed: the numpy path is the only one")
    rng = np.random.default_rng(4)
    for shape, amplitude in (((9, 8, 7), 1.5), ((3, 4, 2), 3.0), ((20, 6, 9), 0.6)):
        disp = (rng.standard_normal(shape + (3,)) * amplitude).astype(np.float32)
        kernel, numpy = ndv.ndv_map(disp), ndv._ndv_map_numpy(disp)
        assert kernel.max() > 0
        np.testing.assert_array_equal(kernel, numpy)
        np.testing.assert_array_equal(ndv.ndv_map(disp.astype(np.float64)), numpy)


def test_dice_by_counts_equals_the_mask_loop() -> None:
    fixed, warped, moving = (_random_labels((20, 22, 18), seed) for seed in (5, 6, 7))
    moving[moving == 3] = 0  # label 3 absent from moving: NaN
    labels = [1, 2, 3, 4, 5, 9]  # 9 absent everywhere: NaN
    got = metrics.dice_per_label(fixed, warped, labels, moving_seg=moving)
    ref = metrics.dice_per_label(fixed.astype(np.float64), warped.astype(np.float64), labels,
                                 moving_seg=moving.astype(np.float64))  # floats take the mask loop
    assert got.keys() == ref.keys()
    for lab in labels:
        assert (np.isnan(got[lab]) and np.isnan(ref[lab])) or got[lab] == ref[lab], lab
    assert np.isnan(got[3]) and np.isnan(got[9]) and 0 < got[1] < 1


def test_surface_codes_equal_the_correlation() -> None:
    rng = np.random.default_rng(8)
    for shape in ((9, 11, 13), (12, 7), (5, 6, 1)):
        mask = rng.random(shape) > 0.6
        box = surface_distance._bounding_box(mask)
        crop = np.zeros(tuple(s.stop - s.start + 1 for s in box), np.int32)
        crop[tuple(slice(0, s.stop - s.start) for s in box)] = mask[box]
        kernel = surface_distance._KERNEL_3D if mask.ndim == 3 else surface_distance._KERNEL_2D
        reference = ndimage.correlate(crop, kernel, mode="constant", cval=0)
        np.testing.assert_array_equal(surface_distance._codes(mask, box), reference)


@needs_data
def test_hd95_on_label_boxes_equals_whole_volume_masks() -> None:
    fixed = np.asarray(nib.load(str(BRAIN_FIXED_SEG)).dataobj)[40:100, 60:130, 70:150]
    warped = np.roll(fixed, (2, -1, 3), axis=(0, 1, 2))
    labels = metrics._labels((fixed, warped))[:12]
    got = metrics.hd95_per_label(fixed, warped, labels, spacing=(1.0, 1.2, 0.8))
    for lab in labels:
        f, w = fixed == lab, warped == lab
        expected = surface_distance.robust_hausdorff(surface_distance.surface_distances(f, w, (1.0, 1.2, 0.8)))
        assert got[lab] == expected, lab
    floats = metrics.hd95_per_label(fixed.astype(np.float32), warped.astype(np.float32), labels)
    assert floats == metrics.hd95_per_label(fixed, warped, labels)  # whole-grid boxes for float maps


def test_nifti_gz_holds_the_bytes_nibabel_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    field = rng.standard_normal((12, 10, 8, 3)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (4.0, -3.0, 7.0)
    ours = save_image(field, affine, tmp_path / "ours.nii.gz")
    img = nib.Nifti1Image(field, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "nibabel.nii.gz"))
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress((tmp_path / "nibabel.nii.gz").read_bytes())
    back = nib.load(str(ours))
    np.testing.assert_array_equal(np.asarray(back.dataobj), field)
    np.testing.assert_array_equal(back.affine, affine)


@pytest.mark.parametrize("shape,spacing,density", [
    ((20, 30, 25), (1.0, 1.0, 1.0), 0.01), ((17, 19, 23), (1.0, 1.2, 0.8), 0.005), ((40, 9, 31), (0.5, 2.0, 1.5), 0.002),
    ((50, 60), (1.0, 1.0), 0.01), ((31, 17), (0.7, 1.3), 0.02), ((12, 1, 9), (1.0, 1.0, 1.0), 0.05)])
def test_distance_transform_equals_scipy(shape: tuple[int, ...], spacing: tuple[float, ...], density: float) -> None:
    marks = np.random.default_rng(len(shape) * 7 + int(density * 1000)).random(shape) < density
    marks.flat[0] = True
    got, reference = distance_to(marks, spacing), ndimage.distance_transform_edt(~marks, sampling=spacing)
    if all(s == 1.0 for s in spacing):  # integer squared distances: identical
        np.testing.assert_array_equal(got, reference)
    else:  # two marks equally near up to rounding may swap: one ulp
        np.testing.assert_allclose(got, reference, rtol=4e-16, atol=0)
        assert np.mean(got == reference) > 0.99


def test_distance_transform_without_marks_is_infinite() -> None:
    assert np.isinf(distance_to(np.zeros((4, 5, 6), bool), (1.0, 1.0, 1.0))).all()
    with pytest.raises(ValueError, match="2D or 3D"):
        distance_to(np.ones(5, bool), (1.0,))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64, bool])
def test_label_counts_equal_bincount(dtype: type) -> None:
    rng = np.random.default_rng(10)
    seg = rng.integers(0, 2 if dtype is bool else 300 if dtype != np.uint8 else 200, (17, 19, 23)).astype(dtype)
    for view in (seg, np.asfortranarray(seg), seg[:, ::2, 3:]):  # C, Fortran and strided maps
        flat = view.ravel().view(np.uint8) if dtype is bool else view.ravel()
        expected = np.bincount(flat, minlength=2)
        got = metrics.label_counts(view)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert metrics.label_counts(seg.astype(np.float32)) is None  # floats are not counted


@pytest.mark.parametrize("size", [1, 7, 8, 9, 129, 10_007, 1_000_003])
def test_std_in_place_equals_numpy_std_bit_for_bit(size: int) -> None:
    values = np.random.default_rng(size).standard_normal(size) * 3.7 + 11.0
    expected = float(values.std())
    assert metrics.population_std_in_place(values.copy()) == expected


def test_sdlogj_reusing_the_determinant_equals_the_evaluator_expression() -> None:
    rng = np.random.default_rng(11)
    detj = rng.standard_normal((14, 15, 16)) * 2.0  # negative values: the clip matters
    mask = rng.random(detj.shape) > 0.3
    for m in (None, np.pad(mask, 2)):  # the mask lies on the uncropped grid
        cropped = detj if m is None else detj[metrics.crop_like_jacobian(m) > 0]
        expected = float(np.log(np.clip(cropped + 3.0, 1e-9, 1e9)).std())
        assert metrics._sdlogj_of(detj, m) == expected
        assert metrics._sdlogj_of(detj.copy(), m, overwrite=True) == expected


def test_surfel_area_table_equals_cross_and_norm() -> None:
    def fan_area(points: np.ndarray, start: int) -> float:
        p = np.roll(points, -start, axis=0)
        return float(0.5 * np.linalg.norm(np.cross(p[1:-1] - p[0], p[2:] - p[0]), axis=1).sum())

    for spacing in ((1.0, 1.0, 1.0), (0.7, 0.8, 2.5)):
        mids = surface_distance._MIDPOINTS * np.asarray(spacing)
        expected = np.zeros(256)
        for code in range(1, 255):
            expected[code] = sum(fan_area(mids[list(cycle)], start)
                                 for cycle, start in surface_distance._triangulation(code))
        np.testing.assert_array_equal(surface_distance.surfel_area_table_3d(spacing), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, bool])
def test_label_boxes_equal_find_objects(dtype: type) -> None:
    rng = np.random.default_rng(12)
    for shape in ((20, 21, 22), (30, 17), (5, 6, 1)):
        seg = np.zeros(shape, dtype)
        seg.flat[rng.integers(0, seg.size, 60)] = rng.integers(1, 2 if dtype is bool else 9, 60).astype(dtype)
        for view in (seg, np.asfortranarray(seg), seg[::2]):  # C, Fortran and strided maps
            expected = ndimage.find_objects(view.view(np.uint8) if dtype is bool else view)
            assert metrics.label_boxes(view) == expected, (shape, view.flags.f_contiguous)


def test_a_3d_register_does_not_import_scipy_ndimage() -> None:
    # importing scipy.ndimage costs 0.3 s of every command; the 3D path needs none of it
    import subprocess
    import sys

    code = ("import sys, numpy as np, dinoreg\n"
            "f = np.random.default_rng(0).random((20, 22, 24)).astype(np.float32)\n"
            "s = (f > 0.5).astype(np.int16)\n"
            "dinoreg.register(f, np.roll(f, 1, 0), fixed_labels=s, moving_labels=np.roll(s, 1, 0), iterations=2,\n"
            "                 progress=False)\n"
            "print('scipy.ndimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
