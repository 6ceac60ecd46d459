"""Landmark CSV reading, world/voxel conversion and the BraTS-Reg case 002 check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinoreg.errors import DinoregError
from dinoreg.io.images import Image, load_image
from dinoreg.io.landmarks import load_landmarks, save_landmarks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRATS = DATA / "bratsreg_002_dirac"


def _image(shape=(20, 30, 40), affine=None):
    return Image(np.zeros(shape, np.float32), np.eye(4) if affine is None else affine, "img.nii.gz")


def _write(tmp_path, text, name="lms.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text", [
    "1,2,3\n4.5,5,6\n",
    "i,j,k\n1,2,3\n4.5,5,6\n",
    "# comment\n1 2 3\n\n4.5\t5 6\n",
    "Landmark,X,Y,Z\n1,1,2,3\n2,4.5,5,6\n",
    "7,1,2,3\n8,4.5,5,6\n",
    "name,extra,x,y,z\na,0,1,2,3\nb,0,4.5,5,6\n",
])
def test_voxel_layouts(tmp_path, text):
    pts = load_landmarks(_write(tmp_path, text), _image(), "voxel")
    assert pts.dtype == np.float64
    assert np.array_equal(pts, [[1, 2, 3], [4.5, 5, 6]])


def test_ras_and_lps_go_through_the_affine(tmp_path):
    affine = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 3, 7], [0, 0, 0, 1]])
    image = _image(affine=affine)
    vox = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    ras = vox @ affine[:3, :3].T + affine[:3, 3]
    p = _write(tmp_path, "\n".join(",".join(map(str, r)) for r in ras))
    assert np.allclose(load_landmarks(p, image, "ras"), vox)
    lps = ras * (-1, -1, 1)
    q = _write(tmp_path, "x,y,z\n" + "\n".join(",".join(map(str, r)) for r in lps), "lps.csv")
    assert np.allclose(load_landmarks(q, image, "lps"), vox)


@pytest.mark.parametrize("space", ["voxel", "ras", "lps"])
def test_save_then_load_round_trip(tmp_path, space):
    affine = np.diag([0.8, -1.2, 2.0, 1.0])
    affine[:3, 3] = (3, 40, -5)
    image = _image(affine=affine)
    vox = np.array([[1.25, 2.5, 3.75], [0.0, 29.0, 39.0]])
    p = save_landmarks(tmp_path / "out.csv", vox, image, space, ids=[1, 2])
    assert np.allclose(load_landmarks(p, image, space), vox)


@pytest.mark.parametrize("text, message", [
    ("1,2\n3,4\n", "3 coordinate columns"),
    ("a,b,c,d,e\n1,2,3,4,5\n", "3 coordinate columns"),
    ("1,2,3\n4,5\n", "line 2 has 2 columns"),
    ("x,y,z\n1,2,3\n4,five,6\n", "line 3 is not numeric"),
    ("x,y,z\n", "no points"),
    ("1,2,3\n1,2,300\n", "landmark 2"),
])
def test_bad_files(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(DinoregError, match=message) as info:
        load_landmarks(p, _image(), "voxel")
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_bad_space(tmp_path):
    with pytest.raises(DinoregError, match="not found"):
        load_landmarks(tmp_path / "nope.csv", _image())
    with pytest.raises(DinoregError, match="unknown landmark space"):
        load_landmarks(_write(tmp_path, "1,2,3\n"), _image(), "mni")


@pytest.mark.skipif(not BRATS.is_dir(), reason="shared BraTS-Reg data not available")
def test_bratsreg_002_initial_landmark_distance():
    base = load_image(BRATS / "BraTSReg_002_00_0000_t1ce.nii.gz", dtype=None)
    follow = load_image(BRATS / "BraTSReg_002_01_0262_t1ce.nii.gz", dtype=None)
    fix = load_landmarks(BRATS / "BraTSReg_002_00_0000_landmarks.csv", base, "lps")
    mov = load_landmarks(BRATS / "BraTSReg_002_01_0262_landmarks.csv", follow, "lps")
    raw = np.loadtxt(BRATS / "BraTSReg_002_00_0000_landmarks.csv", delimiter=",", skiprows=1)[:, 1:]
    assert np.allclose(fix, raw + (0, 239, 0))                        # DIRAC's voxel = (X, Y + 239, Z)
    assert all(base.array[tuple(np.round(p).astype(int))] > 0 for p in fix)   # inside the brain
    dist = np.linalg.norm((fix - mov) * base.spacing, axis=1)
    assert np.allclose(dist, [3.0, 1.0, 1.41, 1.41, 4.12, 3.0], atol=0.01)
    assert dist.mean() == pytest.approx(2.33, abs=0.005)
