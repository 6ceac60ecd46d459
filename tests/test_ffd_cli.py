"""``dinoreg register --method ffd``: 2D slices with an encoder in the loss, argument checks, 3D."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import (BRAIN_FIXED, BRAIN_FIXED_SEG, BRAIN_MOVING, BRAIN_MOVING_SEG, needs_data,
                      needs_weights, write_nifti)
from dinoreg.cli import main

pytestmark = needs_data


def _slice(path, labels=False):
    vol = np.asarray(nib.load(str(path)).dataobj)
    s = vol[40:136, 40:152, vol.shape[2] // 2]  # a 96x112 region of the middle slice
    return np.ascontiguousarray(s.astype(np.int16) if labels else s.astype(np.float32))


@pytest.fixture(scope="module")
def pair2d(tmp_path_factory):
    if not BRAIN_FIXED.exists():
        pytest.skip("../shared/data is not available")
    tmp = tmp_path_factory.mktemp("ffd2d")
    return dict(fixed=write_nifti(tmp / "fixed.nii.gz", _slice(BRAIN_FIXED)),
                moving=write_nifti(tmp / "moving.nii.gz", _slice(BRAIN_MOVING)),
                fixed_seg=write_nifti(tmp / "fseg.nii.gz", _slice(BRAIN_FIXED_SEG, True)),
                moving_seg=write_nifti(tmp / "mseg.nii.gz", _slice(BRAIN_MOVING_SEG, True)))


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_weights
def test_ffd_2d_with_dinov2_writes_a_flat_field_and_metrics(capsys, pair2d, tmp_path):
    code, out, err = _run(capsys, "register", pair2d["fixed"], pair2d["moving"], "-o", tmp_path, "--method", "ffd",
                          "--features", "dinov2", "--alpha", "0.3", "--feature-distance", "l1",
                          "--grid-spacing", "8", "--iterations", "4", "--quiet",
                          "--fixed-labels", pair2d["fixed_seg"], "--moving-labels", pair2d["moving_seg"])
    assert code == 0, err
    disp = np.asarray(nib.load(str(tmp_path / "disp_fixed_moving.nii.gz")).dataobj)
    assert disp.shape == (96, 112, 1, 3) and disp.dtype == np.float32
    assert np.all(disp[..., 2] == 0) and np.abs(disp[..., :2]).max() > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 < metrics["dice_mean"] <= 1 and metrics["sdlogj"] is not None
    assert "Dice" in out


@pytest.mark.parametrize("alpha", ["1.5", "-0.1"])
def test_alpha_outside_unit_interval_is_rejected(capsys, pair2d, tmp_path, alpha):
    code, _, err = _run(capsys, "register", pair2d["fixed"], pair2d["moving"], "-o", tmp_path / "o",
                        "--method", "ffd", "--features", "dinov2", "--alpha", alpha, "--iterations", "1", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "alpha" in lines[0]
    assert not list((tmp_path / "o").glob("disp_*"))


def test_unknown_encoder_is_rejected(capsys, pair2d, tmp_path):
    code, _, err = _run(capsys, "register", pair2d["fixed"], pair2d["moving"], "-o", tmp_path, "--method", "ffd",
                        "--features", "bogus", "--alpha", "0.3", "--iterations", "1", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0]


def test_feature_distance_choices_are_enforced(capsys, pair2d, tmp_path):
    code = main(["register", str(pair2d["fixed"]), str(pair2d["moving"]), "-o", str(tmp_path / "o"),
                 "--method", "ffd", "--feature-distance", "l2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "setting 'feature_distance' must be one of cos" in err[0] and "got 'l2'" in err[0]
    assert not (tmp_path / "o").exists()


@needs_weights
def test_ffd_3d_with_dinov2_on_a_small_crop(brain_volume):
    import dinoreg

    fixed = np.ascontiguousarray(brain_volume[64:96, 80:112, 108:116])
    moving = np.ascontiguousarray(brain_volume[65:97, 79:111, 108:116])
    res = dinoreg.register(fixed, moving, preset_name="ffd", features="dinov2", alpha=0.3, iterations=3,
                           levels=(1,), slice_axis=2, slice_stride=4, grid_spacing=8.0, progress=False, device="cpu")
    assert res.disp.shape == (32, 32, 8, 3) and res.disp.dtype == np.float32
    assert np.isfinite(res.disp).all() and np.abs(res.disp).max() > 0
    assert np.abs(res.disp[..., 2]).max() > 0  # a real 3D field, not a flat 2D one
