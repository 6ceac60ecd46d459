"""Label maps and masks are mapped through their own affines onto their image's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import dinoreg
from dinoreg.cli import main
from dinoreg.errors import DinoregError
from tests.conftest import BRAIN_FIXED, BRAIN_FIXED_SEG, BRAIN_LABELS, BRAIN_MOVING, BRAIN_MOVING_SEG, needs_data

pytestmark = needs_data


def _flipped(path, out, axis: int = 0):
    """The same label map stored with ``axis`` reversed and the affine adjusted (same world space)."""
    img = nib.load(str(path))
    arr = np.flip(np.asanyarray(img.dataobj), axis).copy()
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, 3] + img.affine[:3, axis] * (arr.shape[axis] - 1)
    aff[:3, axis] = -img.affine[:3, axis]
    nib.save(nib.Nifti1Image(arr, aff), str(out))
    return out


def _zero_field(path, reference, zoom: float = 1.0):
    img = nib.load(str(reference))
    shape = tuple(int(round(n / zoom)) for n in img.shape[:3])
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] * zoom
    aff[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ np.full(3, (zoom - 1) / 2)  # same field of view
    nib.save(nib.Nifti1Image(np.zeros((*shape, 3), np.float32), aff), str(path))
    return path


def _labels():
    return [int(x) for x in np.load(BRAIN_LABELS)["labels"]]


def test_flipped_moving_labels_score_like_the_originals(tmp_path):
    field = _zero_field(tmp_path / "disp.nii.gz", BRAIN_FIXED)
    flipped = _flipped(BRAIN_MOVING_SEG, tmp_path / "mseg_flipped.nii.gz")
    plain = dinoreg.evaluate(str(field), str(BRAIN_FIXED_SEG), str(BRAIN_MOVING_SEG), moving=str(BRAIN_MOVING),
                             eval_labels=_labels())
    mapped = dinoreg.evaluate(str(field), str(BRAIN_FIXED_SEG), str(flipped), moving=str(BRAIN_MOVING),
                              eval_labels=_labels())
    assert plain["dice_mean"] == pytest.approx(0.5224, abs=1e-3)
    assert mapped["dice_mean"] == plain["dice_mean"]
    flipped_fixed = _flipped(BRAIN_FIXED_SEG, tmp_path / "fseg_flipped.nii.gz", axis=2)
    again = dinoreg.evaluate(str(field), str(flipped_fixed), str(BRAIN_MOVING_SEG), moving=str(BRAIN_MOVING),
                             eval_labels=_labels())
    assert again["dice_mean"] == plain["dice_mean"]


def test_register_maps_flipped_labels_and_masks(tmp_path):
    def mid(path, out, labels=False):
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)[:, :, img.shape[2] // 2: img.shape[2] // 2 + 1]
        nib.save(nib.Nifti1Image(arr.astype(np.int16 if labels else np.float32), img.affine), str(out))
        return out

    f, m = mid(BRAIN_FIXED, tmp_path / "f.nii.gz"), mid(BRAIN_MOVING, tmp_path / "m.nii.gz")
    fs, ms = mid(BRAIN_FIXED_SEG, tmp_path / "fs.nii.gz", True), mid(BRAIN_MOVING_SEG, tmp_path / "ms.nii.gz", True)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((nib.load(str(fs)).get_fdata() > 0).astype(np.uint8), nib.load(str(fs)).affine),
             str(mask))
    plain = dinoreg.register(str(f), str(m), fixed_labels=str(fs), moving_labels=str(ms), fixed_mask=str(mask),
                             eval_labels=_labels(), progress=False)
    flipped = dinoreg.register(str(f), str(m), fixed_labels=str(_flipped(fs, tmp_path / "fs2.nii.gz", 1)),
                               moving_labels=str(_flipped(ms, tmp_path / "ms2.nii.gz", 0)),
                               fixed_mask=str(_flipped(mask, tmp_path / "mask2.nii.gz", 0)),
                               eval_labels=_labels(), progress=False)
    assert flipped.metrics["dice_mean"] == plain.metrics["dice_mean"]
    np.testing.assert_array_equal(flipped.disp, plain.disp)


def test_labels_on_a_finer_grid_than_the_field_are_mapped(tmp_path):
    fine = dinoreg.evaluate(str(_zero_field(tmp_path / "d1.nii.gz", BRAIN_FIXED)), str(BRAIN_FIXED_SEG),
                            str(BRAIN_MOVING_SEG), eval_labels=_labels())
    coarse = dinoreg.evaluate(str(_zero_field(tmp_path / "d2.nii.gz", BRAIN_FIXED, zoom=2.0)), str(BRAIN_FIXED_SEG),
                              str(BRAIN_MOVING_SEG), eval_labels=_labels())
    assert coarse["dice_mean"] == pytest.approx(fine["dice_mean"], abs=0.03)  # was 0.005 when read as is


def test_labels_that_do_not_cover_their_image_are_refused(tmp_path, capsys):
    img = nib.load(str(BRAIN_MOVING_SEG))
    aff = img.affine.copy()
    aff[:3, 3] += 1000.0
    far = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), aff), str(far))
    field = _zero_field(tmp_path / "disp.nii.gz", BRAIN_FIXED)
    with pytest.raises(DinoregError, match="do not overlap"):
        dinoreg.evaluate(str(field), str(BRAIN_FIXED_SEG), str(far), moving=str(BRAIN_MOVING))
    assert main(["evaluate", str(field), "--fixed-labels", str(BRAIN_FIXED_SEG), "--moving-labels", str(far),
                 "--moving", str(BRAIN_MOVING)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinoreg: error:") and "far.nii.gz" in err[0]
