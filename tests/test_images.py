"""Images with geometry: NIfTI / MHA / NRRD / DICOM read into one RAS convention; bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import DATA, needs_data, write_nifti
from dinoreg.errors import DinoregError
from dinoreg.io.images import Image, as_image, load_image, resample_to_grid, save_image, to_fixed_grid


def _affine() -> np.ndarray:
    a = np.diag([0.8, 1.2, 2.5, 1.0])
    a[:3, 3] = [-10.0, 20.0, 5.0]
    a[:2] *= -1  # a LPS-stored-like orientation (x, y flipped)
    return a


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_roundtrip_keeps_array_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    arr = rng.random((7, 9, 11)).astype(np.float32)
    path = save_image(arr, _affine(), tmp_path / f"img{suffix}")
    img = load_image(path)
    np.testing.assert_allclose(img.array, arr, atol=1e-6)
    np.testing.assert_allclose(img.affine, _affine(), atol=1e-5)
    np.testing.assert_allclose(img.spacing, [0.8, 1.2, 2.5], atol=1e-6)


def test_nifti_and_itk_agree_on_world_coordinates(tmp_path):
    """The same voxel maps to the same RAS point whichever library read the file."""
    import nibabel as nib
    import SimpleITK as sitk

    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nii = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, _affine()), str(nii))
    mha = tmp_path / "a.mha"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(mha))  # ITK's own conversion
    a, b = load_image(nii), load_image(mha)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


@needs_data
def test_dicom_series_folder():
    img = load_image(DATA / "totalsegmentator_examples" / "example_ct_dicom")
    assert img.shape == (512, 512, 20)
    np.testing.assert_allclose(img.spacing, [0.9766, 0.9766, 2.0], atol=1e-3)
    assert img.array.min() < -900  # Hounsfield units


@needs_data
def test_real_brats_geometry():
    img = load_image(DATA / "bratsreg_002_dirac" / "BraTSReg_002_00_0000_t1.nii.gz")
    assert img.shape == (240, 240, 155)
    # LPS (X, Y, Z) = (0, -239, 0) is voxel (0, 0, 0) per SOURCE.md -> RAS (0, 239, 0)
    np.testing.assert_allclose(img.affine @ [0, 0, 0, 1], [0, 239, 0, 1])


def test_2d_image_becomes_single_slice_volume(tmp_path):
    path = write_nifti(tmp_path / "slice.nii.gz", np.ones((6, 7), np.float32))
    assert load_image(path).shape == (6, 7, 1)


def test_resample_through_affines(tmp_path):
    """A moving image whose grid is shifted by 2 voxels in world space is resampled exactly."""
    arr = np.zeros((10, 10, 10), np.float32)
    arr[4, 5, 6] = 1.0
    moving = Image(arr, np.diag([1.0, 1.0, 1.0, 1.0]))
    fixed_aff = np.eye(4)
    fixed_aff[:3, 3] = [2.0, 0.0, -1.0]  # fixed voxel 0 sits at world (2, 0, -1)
    out = resample_to_grid(moving, (10, 10, 10), fixed_aff, order=1)
    assert out[2, 5, 7] == pytest.approx(1.0)
    assert to_fixed_grid(moving, Image(np.zeros((10, 10, 10)), np.eye(4))) is moving


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.nii.gz", "file not found"),
    (lambda p: write_nifti(p / "four_d.nii.gz", np.ones((4, 4, 4, 2), np.float32)), "expected a 3D volume"),
    (lambda p: write_nifti(p / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32)), "NaN/Inf"),
    (lambda p: _write_bytes(p / "junk.nii.gz", b"not an image"), "cannot read image"),
])
def test_bad_images_give_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DinoregError) as err:
        load_image(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_save_is_atomic_and_reports_missing_directory(tmp_path):
    with pytest.raises(DinoregError, match="output directory does not exist"):
        save_image(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "nope" / "x.nii.gz")
    out = save_image(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "x.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_as_image_accepts_arrays_and_library_images():
    import nibabel as nib
    import SimpleITK as sitk

    arr = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    assert as_image(arr).shape == (3, 4, 5)
    assert as_image(nib.Nifti1Image(arr, np.eye(4))).shape == (3, 4, 5)
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    np.testing.assert_allclose(as_image(img).array, arr)
    with pytest.raises(DinoregError, match="cannot use an object"):
        as_image(object())
